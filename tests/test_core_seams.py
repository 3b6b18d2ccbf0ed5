"""The core's seams and the defects found in review: fp32 contrastive logits, no attention mask when
nothing is padded, weight decay and lr multipliers by module path, auxiliary state apart from the
model, the tokenizer taken from the text tower."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from evl.config import from_dict
from evl.errors import ConfigError
from evl.losses.functional import egonce_loss, similarity_logits, vtc_loss
from evl.models.model import ModelConfig, VideoLanguageModel
from evl.train.objective import TrainObjective
from evl.train.optim import build_param_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_contrastive_logits_stay_fp32_under_bf16_autocast():
    """At a logit scale near 100, bf16 logits are ~0.5 apart; the losses must be computed in fp32
    from the (possibly bf16) embeddings, equal to the fp32 computation on the same inputs."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, 32, generator=g).bfloat16()
    t = (v.float() + 0.05 * torch.randn(16, 32, generator=g)).bfloat16()
    scale = torch.tensor(100.0)
    ref = vtc_loss(v.float(), t.float(), scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vtc_loss(v, t, scale)
        got_multi = egonce_loss(v, t, scale, positive_mask=torch.eye(16, dtype=torch.bool))
        logits = similarity_logits(v, t, scale)
    assert got.dtype == torch.float32 and logits.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    assert got_multi.item() == pytest.approx(ref.item(), abs=1e-5)


def test_no_attention_mask_is_built_when_no_frame_is_padded(tiny_model_config, monkeypatch):
    """SDPA's fast path needs attn_mask=None: a batch of whole clips must send no frame mask, and the
    video tower then builds no key mask (a padded batch still does)."""
    import evl.models.layers as layers
    from evl.data.datasets import Collator

    masks = []
    real = layers.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    sample = {"frames": torch.randn(4, 3, 32, 32), "frame_mask": torch.ones(4, dtype=torch.bool), "video_name": "a",
              "clip_key": "a", "index": 0, "verbs": [], "nouns": []}
    batch = Collator(None)([sample, dict(sample, index=1)])
    assert batch["frame_mask"] is None
    model = VideoLanguageModel(tiny_model_config("encoder")).eval()
    with torch.no_grad():
        model.video_features(batch["frames"], batch["frame_mask"])
        assert masks and all(m is None for m in masks)
        masks.clear()
        padded = Collator(None)([sample, dict(sample, frame_mask=torch.tensor([True, True, False, False]))])
        model.video_features(padded["frames"], padded["frame_mask"])
        assert all(m is not None for m in masks)


def test_weight_decay_skips_cls_mask_token_and_position_tables(tiny_model_config):
    model = VideoLanguageModel(tiny_model_config("encoder"))
    groups = build_param_groups(model, weight_decay=0.05)
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    for name in ("video.cls_token", "video.mask_token", "video.pos_embed.temporal", "video.pos_embed.spatial"):
        assert decay[name] == 0.0, name
    assert decay["video.patch_embed.weight"] == 0.05 and decay["text.embeddings.word_embeddings.weight"] == 0.05


def test_lr_mults_match_module_paths_in_both_towers(tiny_model_dict_factory):
    """`*cross_attn` reaches the fusion modules of both towers; `text` is anchored (not text_proj);
    the most specific pattern wins; a pattern that matches nothing is an error."""
    model = VideoLanguageModel(from_dict(ModelConfig, tiny_model_dict_factory("backbone"), where="model"))
    obj = TrainObjective.from_spec(model, {"vtc": 1, "vtm": 1})
    groups = build_param_groups(obj, 0.05, {"*cross_attn": 4.0, "text": 0.3, "vtm_head": 2.0})
    mult = {n: g["lr_mult"] for g in groups for n in g["param_names"]}
    assert mult["model.text.layers.1.cross_attn.gate"] == 4.0
    assert mult["model.video.blocks.1.cross_attn.attn.q.weight"] == 4.0
    assert mult["model.text.layers.0.attn.qkv.weight"] == 0.3
    assert mult["model.text_proj.weight"] == 1.0 and mult["model.vtm_head.weight"] == 2.0
    assert mult["model.video.blocks.0.attn.qkv.weight"] == 1.0
    with pytest.raises(ConfigError, match="'cross' match"):
        build_param_groups(obj, 0.05, {"cross": 4.0})


def test_auxiliary_state_is_saved_apart_and_resumed(tiny_model_dict_factory, synthvl, tmp_path, monkeypatch):
    """A loss term's own module (here a small trainable projection standing for a decoder) lives in
    the training objective: checkpoints keep it in aux.safetensors, the model file alone loads for
    evaluation, and --resume restores both."""
    import evl.losses.registry as losses
    from evl.checkpoint import load_tensors
    from evl.losses.terms import LossTerm
    from evl.recipes import load_recipe, run_recipe

    class Decoded(LossTerm):
        name = "decoded"

        def __init__(self, ctx):
            super().__init__(ctx)
            self.decoder = nn.Linear(ctx.model_cfg.embed_dim, ctx.model_cfg.embed_dim)

        def forward(self, step):
            video, text = step["video"], step["text"]
            return (self.decoder(video.emb) - text.emb.detach()).pow(2).mean()

    monkeypatch.setitem(losses.TERMS, "decoded", Decoded)
    monkeypatch.setenv("CI", "true")
    model = tiny_model_dict_factory("encoder", vocab_size=30522)
    ann = synthvl / "annotations"
    overrides = [f"data.train={ann / 'pretrain.json'}", "train.batch_size=4", "train.log_every=1",
                 "train.ckpt_every=2", f"train.out_dir={tmp_path / 'run'}", "objectives={vtc: 1, decoded: 1}",
                 f"model={json.dumps(model)}"]
    run_recipe(load_recipe(None, overrides + ["train.max_steps=2"]), evaluate=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    aux, weights = load_tensors(ckpt / "aux.safetensors"), load_tensors(ckpt / "model.safetensors")
    assert set(aux) == {"terms.decoded.decoder.weight", "terms.decoded.decoder.bias"}
    assert not any(k.startswith(("terms.", "model.")) for k in weights)
    VideoLanguageModel.from_pretrained(ckpt)             # evaluation needs nothing but the model
    summary = run_recipe(load_recipe(None, overrides + ["train.max_steps=3"]), resume=True, evaluate=False)
    assert summary["steps"] == 3 and "decoded" in summary["final_losses"]
    with pytest.raises(Exception, match="does not fit this run's model and loss terms"):
        run_recipe(load_recipe(None, overrides[:-2] + ["objectives={vtc: 1}", f"model={json.dumps(model)}",
                                                        "train.max_steps=4"]), resume=True, evaluate=False)


def _tiny_tokenizer(folder):
    """A 40-token WordPiece vocabulary saved as tokenizer.json (BERT special tokens included)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "ball", "rolls", "blue", "cube", "spins",
             "left", "right", "the", "green", "cone", "moves", "up", "down"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(40 - len(words))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_comes_from_the_text_tower_and_is_recorded(tiny_model_dict_factory, synthvl, tmp_path, monkeypatch):
    """A text tower with its own vocabulary gets its own tokenizer (not MiniLM's), the checkpoint
    records where it came from and carries tokenizer.json, and evaluation tokenizes the same way."""
    from evl.data.text import tokenizer_for
    from evl.recipes import load_recipe, run_recipe

    folder = _tiny_tokenizer(tmp_path / "tok")
    model = tiny_model_dict_factory("encoder", vocab_size=40)
    model["text"]["tokenizer"] = str(folder)
    monkeypatch.setenv("CI", "true")
    ann = synthvl / "annotations"
    summary = run_recipe(load_recipe(None, [f"data.train={ann / 'pretrain.json'}", f"data.test={ann / 'retrieval_test.json'}",
                                           "train.batch_size=4", "train.max_steps=1", "train.ckpt_every=0",
                                           f"train.out_dir={tmp_path / 'run'}", "eval.rerank_k=0",
                                           f"model={json.dumps(model)}"]))
    final = tmp_path / "run" / "final"
    loaded = VideoLanguageModel.from_pretrained(final)
    assert loaded.cfg.text.tokenizer == str(folder) and (final / "tokenizer.json").is_file()
    tok = tokenizer_for(loaded.cfg, final)
    assert tok.vocab_size == 40 and tok(["a red ball rolls"]).input_ids.tolist() == [[2, 5, 6, 7, 8, 3]]
    assert summary["steps"] == 1 and 0 <= summary["test"]["t2v_r1"] <= 100
    model["text"]["tokenizer"] = None         # MiniLM's 30522 tokens do not fit a 40-token table
    with pytest.raises(ConfigError, match="text.vocab_size=40"):
        run_recipe(load_recipe(None, [f"data.train={ann / 'pretrain.json'}", "train.batch_size=4",
                                      f"train.out_dir={tmp_path / 'run2'}", f"model={json.dumps(model)}"]))


def test_mlm_masks_depend_on_the_sample_not_on_its_batch():
    """A caption's MLM mask comes from its own seed and real length: the same in any batch, padding,
    rank or accumulation step (so resuming with another grad_accum masks as before)."""
    from evl.data.text import Tokenizer
    from evl.losses.terms import MaskTokens

    tok = Tokenizer.from_pretrained("minilm")
    transform = MaskTokens(tok, 0.3)
    texts = ["a red ball rolls to the left", "the blue cube spins twice, then slides slowly away", "green cone"]
    seeds = torch.tensor([11, 22, 33])

    def masks(rows: list[int]) -> dict:
        b = tok([texts[i] for i in rows])
        out = transform({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "sample_seeds": seeds[rows]})
        lengths = b.attention_mask.sum(1).tolist()
        return {i: (out["mlm_input_ids"][j, :n].tolist(), out["mlm_labels"][j, :n].tolist())
                for j, (i, n) in enumerate(zip(rows, lengths, strict=True))}

    together = masks([0, 1, 2])
    assert together == {**masks([2, 0]), **masks([1])}
    assert all(any(label != -100 for label in labels) for _, labels in together.values())
    other = MaskTokens(tok, 0.3)({**{k: v for k, v in zip(("input_ids", "attention_mask"), tok(texts[:1]).__dict__.values(), strict=True)},
                                  "sample_seeds": torch.tensor([12])})
    assert other["mlm_labels"][0].tolist() != together[0][1] or other["mlm_input_ids"][0].tolist() != together[0][0]


def test_objectives_override_replaces_the_recipe_terms():
    from evl.recipes import load_recipe

    assert load_recipe("pretrain-tiny", ["objectives={vtc: 1, egonce: 1}"]).objectives == {"vtc": 1, "egonce": 1}
    assert load_recipe("pretrain-tiny", ["objectives.vtm=0"]).objectives["vtm"] == 0
    with pytest.raises(ConfigError, match="unknown key 'mlm_prob'; it moved: .*mask_prob"):
        load_recipe("pretrain-tiny", ["data.mlm_prob=0.2"])
