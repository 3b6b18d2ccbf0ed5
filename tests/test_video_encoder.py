"""Video encoder: shapes, token dropping, padding, position interpolation, fusion gates, checkpointing,
and numerical parity with HuggingFace VideoMAE (random tiny model, no download)."""

from __future__ import annotations

import pytest
import torch

import needs
from evl.errors import CheckpointError, ConfigError
from evl.models.video import VideoEncoder, VideoEncoderConfig
from evl.models.videomae import load_videomae_state_dict, videomae_to_evl

TINY = dict(image_size=32, patch_size=8, tubelet_size=2, num_frames=4, hidden_size=32, num_layers=2,
            num_heads=4, mlp_ratio=2.0)


def make(seed: int = 0, **kw) -> VideoEncoder:
    torch.manual_seed(seed)
    return VideoEncoder(VideoEncoderConfig(**{**TINY, **kw})).eval()


def clip(b: int = 2, t: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["joint", "divided"])
@pytest.mark.parametrize("cls", [True, False])
def test_shapes(attention, cls):
    enc = make(attention=attention, use_cls_token=cls)
    out = enc(clip())
    n = 2 * 4 * 4 + (1 if cls else 0)
    assert out.tokens.shape == (2, n, 32)
    assert out.cls.shape == (2, 32)
    assert out.token_mask.shape == (2, n) and out.token_mask.all()
    assert out.grid == (2, 4, 4)
    assert torch.isfinite(out.tokens).all()
    if not cls:
        torch.testing.assert_close(out.cls, out.tokens.mean(1))


def test_bad_inputs_name_expected_and_got():
    enc = make()
    with pytest.raises(ValueError, match="1 channels.*in_channels=3"):
        enc(torch.randn(1, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="30x32 is not divisible by patch_size 8"):
        enc(torch.randn(1, 4, 3, 30, 32))
    with pytest.raises(ValueError, match="3 frames is not a multiple of tubelet_size 2"):
        enc(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        enc(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frame_mask must be"):
        enc(clip(), frame_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        enc(clip(), keep_index=torch.tensor([[0, 32], [1, 2]]))


def test_config_errors():
    with pytest.raises(ConfigError, match="attention"):
        VideoEncoderConfig(**TINY, attention="axial")
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        VideoEncoderConfig(**{**TINY, "image_size": 30})
    with pytest.raises(ConfigError, match="unknown key"):
        VideoEncoderConfig.from_dict({"hiden_size": 3})
    cfg = VideoEncoderConfig.from_dict({**TINY, "attention": "divided", "fusion_layers": 1})
    assert VideoEncoderConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("stem", [0, 8])
def test_keep_index_equals_attention_restricted_to_kept_tokens(stem):
    """Joint layout: dropping tokens up front == running all tokens with only the kept ones as keys
    (with a convolutional stem too: the kept-patch projection reads the stem's map)."""
    enc = make(conv_stem=stem)
    frames = clip()
    g = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.randperm(32, generator=g)[:11] for _ in range(2)])
    with torch.no_grad():
        dropped = enc(frames, keep_index=keep).tokens
        x = enc.embed(frames).x
        key_mask = torch.zeros(2, 33, dtype=torch.bool)
        key_mask[:, 0] = True
        key_mask.scatter_(1, keep + 1, True)
        for blk in enc.blocks:
            x = blk(x, key_mask)
        full = enc.finalize(x)
    assert dropped.shape == (2, 12, 32)
    torch.testing.assert_close(dropped[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[:, 1:], full.gather(1, (keep + 1)[..., None].expand(-1, -1, 32)),
                               atol=1e-5, rtol=1e-5)


def test_conv_stem_keeps_the_token_grid():
    """conv_stem: two stride-2 3×3 convs per frame, then a (tubelet, patch/4, patch/4) projection — the
    same tokens and grid as linear patches; its parameters are what the config says."""
    enc = make(conv_stem=8)
    out = enc(clip())
    assert out.tokens.shape == (2, 1 + 2 * 4 * 4, 32) and out.grid == (2, 4, 4)
    assert enc.stem.conv1.weight.shape == (4, 3, 3, 3) and enc.stem.conv2.weight.shape == (8, 4, 3, 3)
    assert enc.patch_embed.weight.shape == (32, 8, 2, 2, 2) and enc.patch_embed.stride == (2, 2, 2)
    assert make().stem is None and make().patch_embed.weight.shape == (32, 3, 2, 8, 8)
    # the stem is what the tubelet projection reads: stem output zeroed → every patch embedding = bias
    with torch.no_grad():
        for p in enc.stem.parameters():
            p.zero_()
        x = enc.embed(clip()).x[:, 1:] - enc.pos_embed(out.grid)[None]
    torch.testing.assert_close(x, enc.patch_embed.bias.expand_as(x).detach())
    cfg = VideoEncoderConfig.from_dict({**TINY, "conv_stem": 8})
    assert VideoEncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="patch_size a multiple of 4"):
        VideoEncoderConfig(**{**TINY, "image_size": 36, "patch_size": 6, "conv_stem": 8})
    with pytest.raises(ConfigError, match="even width"):
        VideoEncoderConfig(**TINY, conv_stem=7)
    with pytest.raises(ConfigError, match="conv_stem"):
        VideoEncoderConfig(**TINY, conv_stem=-2)


def test_keep_index_divided_needs_equal_tokens_per_slot():
    enc = make(attention="divided")
    frames = clip()
    # 3 tokens from each of the 2 temporal slots (16 patches per slot), listed slot by slot
    keep = torch.tensor([[0, 5, 9, 16, 17, 30], [1, 2, 3, 20, 21, 22]])
    out = enc(frames, keep_index=keep)
    assert out.tokens.shape == (2, 7, 32)
    with pytest.raises(ValueError, match="same number of tokens in every slot"):
        enc(frames, keep_index=keep[:, :5])
    with pytest.raises(ValueError, match="3 tokens in each of the 2"):
        enc(frames, keep_index=torch.tensor([[0, 1, 2, 3, 16, 17], [0, 1, 2, 16, 17, 18]]))
    with pytest.raises(ValueError, match="sort"):
        enc(frames, keep_index=keep.flip(1))
    # keeping every token in order is the same as keeping none
    full = torch.arange(32).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(enc(frames, keep_index=full).tokens, enc(frames).tokens)


@pytest.mark.parametrize("stem", [0, 8])
@pytest.mark.parametrize("attention", ["joint", "divided"])
@pytest.mark.parametrize("cls", [True, False])
def test_padded_frame_values_do_not_change_valid_outputs(attention, cls, stem):
    enc = make(attention=attention, use_cls_token=cls, conv_stem=stem)
    t = 8
    frames = clip(t=t)
    # clip 0: 5 real frames (tubelet slot 2 is half real); clip 1: 2 real frames
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 2 + [False] * 6])
    other = torch.where(mask[:, :, None, None, None], frames, torch.randn_like(frames) * 10)
    with torch.no_grad():
        a, b = enc(frames, frame_mask=mask), enc(other, frame_mask=mask)
    c = 1 if cls else 0
    expected_slots = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(a.token_mask[:, c:], expected_slots[:, :, None].expand(2, 4, 16).reshape(2, 64))
    assert torch.isfinite(a.tokens).all()
    valid = a.token_mask
    torch.testing.assert_close(a.tokens[valid], b.tokens[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the test has teeth: without the mask, padded values do reach valid tokens
        unmasked = enc(frames).tokens[valid], enc(other).tokens[valid]
    assert not torch.allclose(*unmasked)


def test_all_frames_padded_stays_finite():
    for attention in ("joint", "divided"):
        enc = make(attention=attention, use_cls_token=False)
        out = enc(clip(), frame_mask=torch.tensor([[False] * 4, [True] * 4]))
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.cls).all()


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_position_embedding_interpolation(pos_embed, attention):
    enc = make(pos_embed=pos_embed, attention=attention)
    native = enc.cfg.native_grid
    pe = enc.pos_embed
    F = torch.nn.functional
    if pos_embed == "learned":
        direct = (pe.temporal[:, None] + pe.spatial[None]).reshape(-1, 32)
        torch.testing.assert_close(pe(native), direct)
        # the interpolations used off-size are the identity at the native size (so the shortcut is exact)
        torch.testing.assert_close(F.interpolate(pe.temporal.T[None], size=2, mode="linear")[0].T, pe.temporal)
        img = pe.spatial.reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(F.interpolate(img, size=(4, 4), mode="bicubic"), img)
    else:
        from evl.models.positions import videomae_sincos_table
        table = videomae_sincos_table(32, 32)
        assert torch.equal(pe(native), table)
        grid = table.reshape(1, 2, 4, 4, 32).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(F.interpolate(grid, size=(2, 4, 4), mode="trilinear"), grid)
    bigger = pe((4, 6, 6))
    assert bigger.shape == (144, 32) and torch.isfinite(bigger).all()
    # more frames and a bigger image than pre-training just run
    with torch.no_grad():
        out = enc(clip(b=1, t=8, size=48))
    assert out.tokens.shape == (1, 1 + 4 * 6 * 6, 32) and out.grid == (4, 6, 6)


def fusion_encoder(attention: str) -> VideoEncoder:
    return make(attention=attention, fusion_layers=1, context_dim=24)


def fused_tokens(enc: VideoEncoder, frames, text, text_mask=None, frame_mask=None) -> torch.Tensor:
    """The tower with its fused blocks attending to `text`, through the one block loop."""
    return enc.finalize(enc.run_blocks(enc.embed(frames, frame_mask), context=text, context_mask=text_mask).x)


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_fusion_gate_zero_is_exact_identity(attention):
    enc = fusion_encoder(attention)
    assert enc.blocks[0].cross_attn is None and enc.blocks[1].cross_attn is not None
    frames = clip()
    text = torch.randn(2, 5, 24)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        dual = enc(frames).tokens
        fused = fused_tokens(enc, frames, text, text_mask)
        assert torch.equal(dual, fused)
        enc.blocks[1].cross_attn.gate.fill_(0.5)
        fused = fused_tokens(enc, frames, text, text_mask)
        assert not torch.allclose(dual, fused)
        assert torch.equal(enc(frames).tokens, dual)  # the tower's forward is the dual path
        # text padding is masked: changing padded text tokens changes nothing
        text2 = text.clone()
        text2[0, 3:] = 100.0
        torch.testing.assert_close(fused_tokens(enc, frames, text2, text_mask), fused)


def test_block_loop_in_pieces_matches_one_call_and_hooks_run_once():
    """Backbone fusion runs the tower block by block; that must equal one call, and a hook placed
    before a block (or after the last) must run exactly once either way."""
    enc = fusion_encoder("divided")
    frames, text = clip(), torch.randn(2, 5, 24)
    calls = []

    def hook(tokens):
        calls.append(tokens.x.shape[1])
        return tokens.replace(x=tokens.x * 1.5)

    hooks = {1: [hook], 2: [hook]}
    with torch.no_grad():
        enc.blocks[1].cross_attn.gate.fill_(1.0)
        ref = enc.run_blocks(enc.embed(frames), context=text, hooks=hooks).x
        tokens = enc.embed(frames)
        for i in range(len(enc.blocks)):
            tokens = enc.run_blocks(tokens, i, i + 1, context=text, hooks=hooks)
        torch.testing.assert_close(tokens.x, ref)
        assert len(calls) == 4   # two hooks, two runs
        with pytest.raises(ValueError, match="time_slots"):
            enc.blocks[0](tokens.x, tokens.key_mask)


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_grad_checkpointing_same_outputs_and_grads(attention):
    plain = make(attention=attention, fusion_layers=1).train()
    ckpt = make(attention=attention, fusion_layers=1, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    for enc in (plain, ckpt):
        enc.blocks[1].cross_attn.gate.data.fill_(0.3)
    frames, text = clip(), torch.randn(2, 3, 32)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    outs = []
    for enc in (plain, ckpt):
        tokens = enc.finalize(enc.run_blocks(enc.embed(frames, mask), context=text).x)
        (tokens.square().mean() + tokens[:, 0].sum()).backward()
        outs.append((tokens.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], msg=name)


# ---------------------------------------------------------------------------------------- VideoMAE parity


def tiny_videomae(use_mean_pooling: bool):
    transformers = needs.module("transformers", "pip install transformers (in the dev extra)")
    hc = transformers.VideoMAEConfig(image_size=32, patch_size=8, tubelet_size=2, num_frames=4, hidden_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                                     use_mean_pooling=use_mean_pooling)
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(hc).eval()
    with torch.no_grad():  # HF init zeroes biases and unit-LN; perturb so every mapped tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hc, model


@pytest.mark.parametrize("use_mean_pooling", [False, True])
def test_videomae_parity(use_mean_pooling):
    hc, hf = tiny_videomae(use_mean_pooling)
    cfg = VideoEncoderConfig.from_videomae(hc)
    assert cfg.final_norm == (not use_mean_pooling) and not cfg.use_cls_token and cfg.pos_embed == "sincos"
    enc = VideoEncoder(cfg).eval()
    report = load_videomae_state_dict(enc, hf.state_dict())
    assert report.missing == []
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=frames).last_hidden_state
        out = enc(frames)
    assert out.tokens.shape == ref.shape
    assert (out.tokens - ref).abs().max().item() <= 1e-4
    torch.testing.assert_close(out.cls, ref.mean(1), atol=1e-4, rtol=1e-4)


def _to_original_layout(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF VideoMAE keys → the original MCG-NJU layout (qkv weight + q_bias/v_bias, blocks.N...)."""
    out = {"patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf_sd["layernorm.weight"], "norm.bias": hf_sd["layernorm.bias"],
           "head.weight": torch.zeros(3, 48)}
    for i in range(2):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.attention."
        out[o + "attn.qkv.weight"] = torch.cat([hf_sd[a + n + ".weight"] for n in ("query", "key", "value")])
        out[o + "attn.q_bias"], out[o + "attn.v_bias"] = hf_sd[a + "query.bias"], hf_sd[a + "value.bias"]
        for src, dst in (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            for leaf in ("weight", "bias"):
                out[o + dst + "." + leaf] = hf_sd[h + src + "." + leaf]
    return out


def test_videomae_original_layout_and_prefixes():
    hc, hf = tiny_videomae(False)
    hf_sd = hf.state_dict()
    ref = VideoEncoder(VideoEncoderConfig.from_videomae(hc)).eval()
    load_videomae_state_dict(ref, hf_sd)
    for sd in (_to_original_layout(hf_sd),
               {"encoder." + k: v for k, v in _to_original_layout(hf_sd).items()},
               {**{"videomae." + k: v for k, v in hf_sd.items()}, "classifier.weight": torch.zeros(2, 48)}):
        enc = VideoEncoder(VideoEncoderConfig.from_videomae(hc)).eval()
        report = load_videomae_state_dict(enc, sd)
        assert report.ignored and report.missing == []
        for key, value in ref.state_dict().items():
            assert torch.equal(enc.state_dict()[key], value), key
    mapped, _ = videomae_to_evl(hf_sd)
    bias = mapped["blocks.0.attn.qkv.bias"]
    assert torch.equal(bias[48:96], torch.zeros(48))  # VideoMAE has no key bias


def test_videomae_mismatches_are_checkpoint_errors():
    hc, hf = tiny_videomae(False)
    with pytest.raises(CheckpointError, match="not recognised|not part of"):
        load_videomae_state_dict(VideoEncoder(VideoEncoderConfig.from_videomae(hc)), {"foo.bar": torch.zeros(1)})
    divided = VideoEncoder(VideoEncoderConfig.from_videomae(hc, attention="divided", use_cls_token=True))
    with pytest.raises(CheckpointError, match="strict=False"):
        load_videomae_state_dict(divided, hf.state_dict())
    report = load_videomae_state_dict(divided, hf.state_dict(), strict=False)
    assert "cls_token" in report.missing and "blocks.0.time_attn.qkv.weight" in report.missing
    no_norm = VideoEncoder(VideoEncoderConfig.from_videomae(hc, final_norm=False))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_videomae_state_dict(no_norm, hf.state_dict())
