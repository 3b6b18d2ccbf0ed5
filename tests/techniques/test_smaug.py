"""SMAUG: masked autoencoding of video (visible-only encoder, decoder, per-tubelet targets) and
space-time token sparsification (EViT top-ρ per slot with a fused token, text-guided frame selection),
as loss terms / token operations of the training objective, and their configuration errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evl.config import from_dict
from evl.errors import ConfigError
from evl.losses.registry import build_terms, parse_objectives
from evl.losses.terms import TermContext
from evl.models.masking import normalize_targets, patchify
from evl.models.model import ModelConfig, VideoLanguageModel
from evl.models.tokens import VideoTokens
from evl.models.video import VideoEncoder, VideoEncoderConfig
from evl.techniques.smaug.mae import MaskVideo
from evl.techniques.smaug.sparsify import (
    SpatialSparsify,
    TextGuidedFrameSelector,
    cls_attention,
    keep_rate_at,
    num_kept,
    sparsify_slots,
)
from evl.train.objective import TrainObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model_dict(attention: str = "joint", kind: str = "encoder") -> dict:
    """8 frames of 64² with 16² patches and 2-frame tubelets: a 4 x 4 x 4 grid (64 patches)."""
    return {"video": {"image_size": 64, "patch_size": 16, "tubelet_size": 2, "num_frames": 8, "hidden_size": 32,
                      "num_layers": 3, "num_heads": 2, "attention": attention},
            "text": {"pretrained": None, "vocab_size": 100, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0},
            "fusion": {"kind": kind, "num_layers": 1, "num_heads": 2}, "embed_dim": 16}


def _model(attention: str = "joint", kind: str = "encoder") -> VideoLanguageModel:
    torch.manual_seed(0)
    return VideoLanguageModel(from_dict(ModelConfig, _model_dict(attention, kind), where="model"))


class _Tok:
    """The least a tokenizer must offer MLM masking (ids 0..99, [MASK]=3)."""

    vocab_size, mask_id = 100, 3
    special_ids = (0, 1, 2, 3)


def _batch(b: int = 4, seed: int = 0, padded: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, 6), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    frame_mask = None
    if padded:
        frame_mask = torch.ones(b, 8, dtype=torch.bool)
        frame_mask[0, 4:] = False                         # clip 0: its last two time slots are padding
    return {"frames": torch.randn(b, 8, 3, 64, 64, generator=g), "frame_mask": frame_mask,
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "sample_seeds": torch.arange(b) + 10 * seed,
            "clip_keys": [f"c{i}" for i in range(b)]}


def _objective(model, spec: dict) -> TrainObjective:
    return TrainObjective.from_spec(model, spec, _Tok())


def _collated(objective: TrainObjective, batch: dict) -> dict:
    for transform in objective.batch_transforms():
        batch = transform(batch)
    return batch


# ------------------------------------------------------------------------------- masked autoencoding


def test_only_visible_tokens_enter_the_encoder_and_its_flops_fall():
    from torch.utils.flop_counter import FlopCounterMode

    model = _model()
    objective = _objective(model, {"vtc": 1, "mae": {"mask_ratio": 0.75, "decoder_layers": 1}})
    batch = _collated(objective, _batch())
    assert batch["video_hidden"].sum(1).tolist() == [48] * 4          # 12 of each slot's 16 patches, 4 slots
    seen = []
    handle = model.video.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    objective(batch)["loss"].backward()
    handle.remove()
    assert seen == [1 + 16]          # one video forward (shared by VTC and MAE): CLS + the 16 visible patches

    frames = batch["frames"]
    with FlopCounterMode(display=False) as dense:
        model.video_features(frames)
    with FlopCounterMode(display=False) as masked:
        model.video_features(frames, keep_index=batch["video_keep_index"])
    ratio = masked.get_total_flops() / dense.get_total_flops()
    # linear layers scale with the token count (17/65), attention with its square: below 17/65 overall
    assert (17 / 65) ** 2 < ratio < 17 / 65


def test_unshared_mae_encodes_the_whole_clip_for_the_other_terms():
    model = _model()
    objective = _objective(model, {"vtc": 1, "mae": {"mask_ratio": 0.75, "decoder_layers": 1, "shared": False}})
    batch = _collated(objective, _batch())
    assert "video_keep_index" not in batch
    seen = []
    handle = model.video.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    objective(batch)
    handle.remove()
    assert sorted(seen) == [17, 65]   # the whole clip for VTC, the visible patches for MAE


PREDICTION = torch.randn(4, 48, 2 * 16 * 16 * 3, generator=torch.Generator().manual_seed(1))


def _fixed_decoder(term):
    """Make the decoder predict a fixed tensor, so the loss is a known function of the masked targets
    (all zeros would not do: normalised targets have a fixed mean square per tubelet)."""
    def predict(tokens, positions, grid, mask, key_mask=None, grid_valid=None):
        return PREDICTION[:, :int(mask.sum(1)[0])] + 0 * tokens.sum()
    term.decoder.forward = predict


def test_reconstruction_loss_is_on_masked_tubelets_only():
    model = _model()
    objective = _objective(model, {"mae": {"mask_ratio": 0.75, "decoder_layers": 1}})
    _fixed_decoder(objective.terms["mae"])
    batch = _collated(objective, _batch())
    mask = batch["video_hidden"]
    targets = normalize_targets(patchify(batch["frames"], 16, 2), 3)
    expected = (targets[mask].view(4, 48, -1) - PREDICTION).pow(2).mean()
    assert objective(batch)["mae"].item() == pytest.approx(expected.item(), rel=1e-5)

    def frames_with(token: int) -> dict:   # clip 0, tubelet `token`, all pixels multiplied by a ramp
        changed = dict(batch)
        frames = batch["frames"].clone()
        slot, rest = divmod(token, 16)
        row, col = divmod(rest, 4)
        ramp = torch.linspace(-3, 3, 16 * 16).view(16, 16)
        frames[0, 2 * slot:2 * slot + 2, :, 16 * row:16 * row + 16, 16 * col:16 * col + 16] *= ramp
        changed["frames"] = frames
        return changed

    visible = int((~mask[0]).nonzero()[0])
    hidden = int(mask[0].nonzero()[0])
    assert objective(frames_with(visible))["mae"].item() == pytest.approx(expected.item(), rel=1e-6)
    changed = frames_with(hidden)
    targets = normalize_targets(patchify(changed["frames"], 16, 2), 3)
    moved = (targets[mask].view(4, 48, -1) - PREDICTION).pow(2).mean()
    assert abs(moved.item() - expected.item()) > 1e-5
    assert objective(changed)["mae"].item() == pytest.approx(moved.item(), rel=1e-6)


def test_padded_tubelets_are_not_reconstructed():
    model = _model()
    objective = _objective(model, {"mae": {"mask_ratio": 0.75, "decoder_layers": 1}})
    _fixed_decoder(objective.terms["mae"])
    batch = _collated(objective, _batch(padded=True))
    mask = batch["video_hidden"]
    targets = normalize_targets(patchify(batch["frames"], 16, 2), 3)
    err = (targets[mask].view(4, 48, -1) - PREDICTION).pow(2).mean(-1)
    real = torch.ones(4, 48, dtype=torch.bool)
    real[0] = mask[0].nonzero()[:, 0] < 32                  # clip 0's slots 2 and 3 are padding
    assert 0 < int(real[0].sum()) < 48
    assert objective(batch)["mae"].item() == pytest.approx(err[real].mean().item(), rel=1e-5)


def test_targets_are_normalised_per_tubelet_and_channel():
    model = _model()
    term = _objective(model, {"mae": {"decoder_layers": 1}}).terms["mae"]
    frames = torch.rand(2, 8, 3, 64, 64) * 5 + 2
    t = term.targets(frames).view(2, 64, 2 * 16 * 16, 3)
    assert torch.allclose(t.mean(dim=2), torch.zeros(2, 64, 3), atol=1e-5)
    assert torch.allclose(t.std(dim=2), torch.ones(2, 64, 3), atol=1e-3)
    raw = _objective(model, {"mae": {"decoder_layers": 1, "norm_targets": False}}).terms["mae"]
    assert torch.equal(raw.targets(frames), patchify(frames, 16, 2))


def test_decoder_predicts_masked_places_from_the_placed_tokens():
    model = _model()
    term = _objective(model, {"mae": {"mask_ratio": 0.75, "decoder_layers": 2}}).terms["mae"]
    batch = _collated(_objective(model, {"mae": {"mask_ratio": 0.75, "decoder_layers": 2}}), _batch())
    video = model.video_features(batch["frames"], keep_index=batch["video_keep_index"])
    pred = term.decoder(video.tokens, video.positions, video.grid, batch["video_hidden"])
    assert pred.shape == (4, 48, 2 * 16 * 16 * 3)
    # a token placed elsewhere in the grid changes the prediction: positions matter
    moved = video.positions.flip(1)
    assert not torch.allclose(pred, term.decoder(video.tokens, moved, video.grid, batch["video_hidden"]))


def test_video_masks_are_per_sample_and_reproducible():
    t = MaskVideo(16, 2, 0.75, "tube", shared=True)
    a = t({"frames": torch.zeros(3, 8, 3, 64, 64), "sample_seeds": torch.tensor([5, 6, 7])})
    b = t({"frames": torch.zeros(2, 8, 3, 64, 64), "sample_seeds": torch.tensor([7, 5])})
    assert torch.equal(a["video_hidden"][2], b["video_hidden"][0]) and torch.equal(a["video_hidden"][0], b["video_hidden"][1])
    assert not torch.equal(a["video_hidden"][0], a["video_hidden"][1])
    m = a["video_hidden"].view(3, 4, 16)
    assert bool((m == m[:, :1]).all())                         # tubes: the same places in every time slot
    assert a["video_keep_index"].shape == (3, 16)


# ------------------------------------------------------------------------------------ sparsification


def test_keep_rate_schedule_and_counts():
    assert keep_rate_at(0.0, 0.7, 0.3) == 1.0
    assert keep_rate_at(0.15, 0.7, 0.3) == pytest.approx(0.85)
    assert keep_rate_at(0.3, 0.7, 0.3) == keep_rate_at(0.9, 0.7, 0.3) == 0.7
    assert keep_rate_at(0.0, 0.7, 0.0) == 0.7
    rates = [keep_rate_at(p / 20, 0.5, 0.5) for p in range(21)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert (num_kept(10, 0.7), num_kept(16, 0.7), num_kept(4, 0.7), num_kept(4, 0.01)) == (7, 12, 3, 1)


def _tokens(b=2, t=2, s=4, d=3, prefix=1, grid=(2, 2, 2)) -> VideoTokens:
    x = torch.arange(b * (prefix + t * s) * d, dtype=torch.float32).view(b, prefix + t * s, d)
    pos = torch.arange(t * s).expand(b, -1).clone()
    return VideoTokens(x, None, pos, grid, t, prefix)


def test_top_rho_keeps_the_highest_scored_and_fuses_the_rest():
    tokens = _tokens()
    scores = torch.tensor([[[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.1]],
                           [[0.9, 0.0, 0.04, 0.06], [0.2, 0.2, 0.3, 0.3]]])
    out = sparsify_slots(tokens, scores, keep=2)
    assert out.x.shape == (2, 1 + 2 * 3, 3) and out.time_slots == 2
    assert out.positions.tolist() == [[1, 3, -1, 4, 6, -1], [0, 3, -1, 6, 7, -1]]   # kept in original order
    x = tokens.x[:, 1:].view(2, 2, 4, 3)
    assert torch.equal(out.x[:, 0], tokens.x[:, 0])                                  # CLS untouched
    assert torch.allclose(out.x[0, 3], 0.1 * x[0, 0, 0] + 0.2 * x[0, 0, 2])          # slot 0 of clip 0
    assert torch.allclose(out.x[1, 6], 0.2 * x[1, 1, 0] + 0.2 * x[1, 1, 1])          # slot 1 of clip 1
    assert torch.equal(out.x[0, 1], x[0, 0, 1]) and torch.equal(out.x[1, 5], x[1, 1, 3])

    # a second stage folds the earlier fused token into the new one, weighted by its own score
    again = sparsify_slots(out, torch.tensor([[[0.6, 0.2, 0.2], [0.1, 0.7, 0.2]]] * 2), keep=1)
    assert again.positions.tolist()[0] == [1, -1, 6, -1]
    assert torch.allclose(again.x[0, 2], 0.2 * out.x[0, 2] + 0.2 * out.x[0, 3])


def test_cls_attention_matches_the_blocks_own_attention():
    cfg = VideoEncoderConfig(image_size=64, patch_size=16, tubelet_size=2, num_frames=4, hidden_size=32,
                             num_layers=2, num_heads=4)
    enc = VideoEncoder(cfg)
    tokens = enc.embed(torch.randn(2, 4, 3, 64, 64))
    block = enc.blocks[1]
    h = block.norm1(tokens.x)
    q, k, _ = block.attn.qkv(h).chunk(3, dim=-1)
    q, k = (t.view(2, -1, 4, 8).transpose(1, 2) for t in (q, k))
    reference = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)[:, :, 0, 1:].mean(1)
    assert torch.allclose(cls_attention(block, tokens).reshape(2, -1), reference, atol=1e-6)

    hook = SpatialSparsify(block, 0.5)
    out = hook(tokens)
    assert out.x.shape == (2, 1 + 2 * (8 + 1), 32)                  # 16 of 32 per... 8 of 16 per slot, + fused
    kept = out.positions.view(2, 2, 9)[..., :8]
    top = reference.view(2, 2, 16).topk(8, dim=-1).indices.sort(-1).values + torch.tensor([0, 16])[None, :, None]
    assert torch.equal(kept, top)


def test_divided_attention_sparsifies_within_each_slot():
    cfg = VideoEncoderConfig(image_size=64, patch_size=16, tubelet_size=2, num_frames=4, hidden_size=32,
                             num_layers=2, num_heads=4, attention="divided")
    enc = VideoEncoder(cfg)
    tokens = enc.embed(torch.randn(2, 4, 3, 64, 64))
    weights = cls_attention(enc.blocks[1], tokens)
    cls_share = 1 - weights.sum(-1)                                    # each slot's softmax includes the CLS key
    assert bool(((cls_share > 0) & (cls_share < 1)).all())
    out = enc.run_blocks(tokens, hooks={1: [SpatialSparsify(enc.blocks[1], 0.25)]})
    assert out.x.shape == (2, 1 + 2 * 5, 32) and out.time_slots == 2


def test_frame_selector_keeps_k_distinct_slots_in_order_with_gradient():
    torch.manual_seed(0)
    tokens = _tokens(b=3, t=5, s=2, d=8, grid=(5, 1, 2))
    tokens = tokens.replace(x=torch.randn(3, 11, 8, requires_grad=True))
    selector = TextGuidedFrameSelector(video_dim=8, text_dim=6, keep=3, dim=4)
    text = torch.randn(3, 6)
    out = selector.select(tokens, text)
    slots = out.positions.view(3, 3, 2)[..., 0] // 2
    scores = selector.scores(tokens, text)
    for row in range(3):
        chosen = slots[row].tolist()
        assert chosen == sorted(chosen) and len(set(chosen)) == 3
        assert set(chosen) == set(scores[row].topk(3).indices.tolist())
    assert out.time_slots == 3 and out.x.shape == (3, 1 + 6, 8)
    assert torch.equal(out.x[:, 1:].detach(), tokens.x[:, 1:].view(3, 5, 2, 8).gather(
        1, slots[..., None, None].expand(-1, -1, 2, 8)).reshape(3, 6, 8).detach())   # values unchanged (gate = 1)
    (out.x[:, 1:] * torch.randn(3, 6, 8)).sum().backward()
    assert selector.video.weight.grad is not None and selector.video.weight.grad.abs().sum() > 0
    assert selector.text.weight.grad.abs().sum() > 0
    assert torch.equal(selector.select(tokens, text).positions, out.positions)       # deterministic


def test_frame_selector_never_picks_padded_slots():
    tokens = _tokens(b=1, t=4, s=2, d=8, grid=(4, 1, 2))
    key_mask = torch.ones(1, 9, dtype=torch.bool)
    key_mask[0, 1:5] = False                                             # slots 0 and 1 are padding
    tokens = tokens.replace(x=torch.randn(1, 9, 8), key_mask=key_mask)
    selector = TextGuidedFrameSelector(8, 6, keep=2, dim=4)
    for seed in range(5):
        torch.manual_seed(seed)
        out = selector.select(tokens, torch.randn(1, 6) * 10)
        assert (out.positions // 2).unique().tolist() == [2, 3]
        assert bool(out.key_mask.all())


# ----------------------------------------------------------------------- in the training objective


@pytest.mark.parametrize("attention,kind", [("joint", "encoder"), ("divided", "encoder"), ("divided", "backbone")])
def test_smaug_objective_trains_with_every_layout(attention, kind):
    model = _model(attention, kind)
    spec = {"vtc": 1, "vtm": 1, "mlm": 1, "mae": {"mask_ratio": 0.5, "decoder_layers": 1},
            "sparsify": {"keep_rate": 0.5, "layers": [2], "keep_frames": 2, "frame_layer": 1, "rate_warmup": 0.5}}
    objective = _objective(model, spec)
    assert set(objective.weights) == {"vtc", "vtm", "mlm", "mae"} and "sparsify" in objective.terms
    batch = _collated(objective, _batch(padded=True))
    sizes = []
    handles = [blk.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1]))
               for blk in model.video.blocks]
    batch["train_progress"] = 1.0
    out = objective(batch)
    for h in handles:
        h.remove()
    assert set(out) >= {"loss", "vtc", "vtm", "mlm", "mae"} and "sparsify" not in out
    assert all(math.isfinite(v.item()) for v in out.values())
    out["loss"].backward()
    assert objective.terms["sparsify"].selector.video.weight.grad.abs().sum() > 0
    # dual pass: 32 visible patches in 4 slots; frame selection keeps 2 slots (16 tokens) before block 1;
    # sparsification halves each slot's 8 patches before the sparsified block and adds one fused token
    cls = 1
    if kind == "encoder":
        assert sizes[:3] == [cls + 32, cls + 16, cls + 2 * (4 + 1)]
    else:
        assert sizes[:2] == [cls + 32, cls + 16]
        assert set(sizes[2:]) == {cls + 2 * (4 + 1)}                     # the fused block, in every pass
    batch["train_progress"] = 0.0                                        # keep rate 1 at the start: no drop
    sizes.clear()
    handles = [blk.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1]))
               for blk in model.video.blocks]
    objective(batch)
    for h in handles:
        h.remove()
    assert sizes[2] == cls + 16


def test_trainer_reports_training_progress_to_the_step(tmp_path):
    from evl.train.trainer import TrainConfig, Trainer

    seen = []

    def loss_fn(module, batch):
        seen.append(batch.get("train_progress"))   # the probe before training runs without one
        return {"loss": module(batch["x"]).pow(2).mean()}

    data = [{"x": torch.randn(3)} for _ in range(8)]
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, warmup_steps=0, ckpt_every=0, log_every=1,
                      out_dir=str(tmp_path / "run"))
    Trainer(torch.nn.Linear(3, 1), loss_fn, data, cfg).fit()
    assert seen[-4:] == [0.0, 0.25, 0.5, 0.75]


# ----------------------------------------------------------------------------------- bad configuration


def _ctx(attention="joint", kind="encoder"):
    return TermContext(from_dict(ModelConfig, _model_dict(attention, kind), where="model"), _Tok())


@pytest.mark.parametrize("spec,message", [
    ({"sparsify": {"keep_rate": 1.5}}, r"objectives\.sparsify: keep_rate=1\.5 is outside \(0, 1\)"),
    ({"sparsify": {"keep_rate": 0}}, r"objectives\.sparsify: keep_rate=0\.0 is outside \(0, 1\)"),
    ({"mae": {"mask_ratio": 1.0}}, r"objectives\.mae: mask_ratio=1\.0 is outside \(0, 1\)"),
    ({"mae": {"mask_ratio": -0.1}}, r"objectives\.mae: mask_ratio=-0\.1 is outside \(0, 1\)"),
    ({"mae": {"mask_ratio": 0.99}}, r"objectives\.mae: ratio=0\.99 masks round\(0\.99 \* 16\) = 16 of 16"),
    ({"sparsify": {"keep_frames": 5}}, r"keep_frames=5 must be in \[1, 4\]: the model's clips have 4 time slots"),
    ({"sparsify": {"layers": [3]}}, r"layers contains 3, beyond the video tower's depth: .* must be in \[0, 2\]"),
    ({"sparsify": {"layers": 2}}, r"layers=2 must be a list of block indices"),
    ({"sparsify": {"keep_frames": 2, "frame_layer": 3}}, r"frame_layer=3 must be in \[0, 2\]"),
    ({"sparsify": {"weight": 1.0}}, r"objectives\.sparsify is a token operation with no loss of its own"),
    ({"sparsify": 0.5}, r"objectives\.sparsify is a token operation with no loss: give its options as a mapping"),
    ({"mae": {"mask": "blocks"}}, r"objectives\.mae: mask='blocks' is not one of \['random', 'tube'\]"),
])
def test_bad_configuration_names_key_value_and_range(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_terms({"vtc": 1, **spec}, _ctx())


def test_layout_specific_configuration_errors():
    with pytest.raises(ConfigError, match=r"mask='random' hides a different number .* use mask='tube'"):
        build_terms({"mae": {"mask": "random"}}, _ctx("divided"))
    with pytest.raises(ConfigError, match=r"frame_layer=2 must be in \[0, 1\]: .*fused top layers=1"):
        build_terms({"vtc": 1, "sparsify": {"keep_frames": 2, "frame_layer": 2}}, _ctx("divided", "backbone"))
    no_cls = _model_dict()
    no_cls["video"]["use_cls_token"] = False
    ctx = TermContext(from_dict(ModelConfig, no_cls, where="model"), _Tok())
    with pytest.raises(ConfigError, match=r"has none \(video.use_cls_token: false\); set layers: \[\]"):
        build_terms({"vtc": 1, "sparsify": {}}, ctx)
    with pytest.raises(ConfigError, match="every loss term has weight 0"):
        parse_objectives({"sparsify": {"keep_rate": 0.5}})


def test_token_operation_switches():
    assert parse_objectives({"vtc": 1, "sparsify": True}) == {"vtc": (1.0, {}), "sparsify": (0.0, {})}
    for off in (False, 0, None):
        assert parse_objectives({"vtc": 1, "sparsify": off}) == {"vtc": (1.0, {})}


def test_random_mask_with_sparsification_fails_clearly_at_run_time():
    model = _model()
    objective = _objective(model, {"vtc": 1, "mae": {"mask": "random", "decoder_layers": 1},
                                   "sparsify": {"keep_rate": 0.5, "layers": [1]}})
    batch = _collated(objective, _batch())
    batch["train_progress"] = 1.0
    with pytest.raises(ValueError, match="same number of tokens in every time slot|grouped slot by slot"):
        objective(batch)


# ------------------------------------------------------------------------------- recipes, end to end


def test_smaug_recipes_load():
    from evl.recipes import load_recipe, objectives_of

    tiny, small = load_recipe("smaug-tiny"), load_recipe("smaug-small")
    assert set(objectives_of(tiny)) == {"vtc", "vtm", "mlm", "mae", "sparsify"}
    assert small.model.video.image_size == 224 and objectives_of(small)["sparsify"]["layers"] == [2, 4]
    for recipe in (tiny, small):   # the options build on the recipe's own model
        build_terms(objectives_of(recipe), TermContext(recipe.model, _Tok()))


def test_smaug_pretrain_then_eval_without_the_auxiliary_modules(synthvl, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from evl.checkpoint import AUX_FILE
    from evl.cli import app

    monkeypatch.setenv("CI", "true")
    ann = synthvl / "annotations"
    model = _model_dict()
    model["text"]["vocab_size"] = 30522
    model["video"]["image_size"] = 32                   # 2 x 2 patches per slot, 4 slots
    runner = CliRunner()
    result = runner.invoke(app, [
        "pretrain", "smaug-tiny", f"model={json.dumps(model)}", f"data.train={ann / 'pretrain.json'}",
        f"data.test={ann / 'retrieval_test.json'}", f"data.videos={synthvl / 'videos'}", "train.max_steps=3",
        "train.batch_size=4", "train.ckpt_every=3", "train.warmup_steps=0", f"train.out_dir={tmp_path / 'run'}",
        "objectives.mae.mask_ratio=0.5", "objectives.sparsify.layers=[1]", "objectives.sparsify.keep_rate=0.5",
        "objectives.sparsify.keep_frames=2", "objectives.sparsify.rate_warmup=0", "eval.batch_size=4",
        "eval.rerank_k=2"])
    assert result.exit_code == 0, result.output
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    from safetensors import safe_open

    with safe_open(str(ckpt / AUX_FILE), "pt") as f:
        aux = set(f.keys())
    assert any(k.startswith("terms.mae.decoder.") for k in aux)
    assert any(k.startswith("terms.sparsify.selector.") for k in aux)
    # the trained selector chooses frames for a text at inference too
    from evl.techniques.smaug.sparsify_term import frame_selector_from_checkpoint

    selector, layer = frame_selector_from_checkpoint(ckpt)
    assert layer == 1 and selector.keep == 2
    trained = VideoLanguageModel.from_pretrained(tmp_path / "run" / "final")
    text = trained.encode_text(torch.tensor([[101, 2417, 102]]), torch.ones(1, 3, dtype=torch.long))
    frames = torch.randn(1, 8, 3, 32, 32)
    chosen = trained.video_features(frames, hooks={layer: [selector.hook(text)]})
    assert chosen.positions.shape == (1, 2 * 4) and chosen.emb.shape == (1, 16)
    with pytest.raises(Exception, match="not in final/|not trained with frame selection"):
        frame_selector_from_checkpoint(tmp_path / "run" / "final")
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run" / "final"), "--task", "retrieval",
                                    "--data", str(ann / "retrieval_test.json"), "--batch-size", "4",
                                    "--rerank-k", "2", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["num_videos"] == 2 and 0.0 <= metrics["t2v_r1"] <= 100.0
