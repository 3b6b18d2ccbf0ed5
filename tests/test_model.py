"""VideoLanguageModel: dual/fusion paths, EgoVLPv2 zero-gate identity, persistence, configs, efficiency,
and the training objective — all on tiny random-init models (no MiniLM weights except the packaged-config test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from evl.config import from_dict, load_yaml, to_dict
from evl.efficiency import count_parameters, gflops_per_clip
from evl.errors import CheckpointError, ConfigError
from evl.models.fusion import FusionConfig
from evl.models.model import ModelConfig, VideoLanguageModel, build_model
from evl.models.text import TextEncoderConfig
from evl.models.video import VideoEncoderConfig
from evl.techniques.egovlpv2.fusion import run_lockstep
from evl.train.objective import TrainObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KINDS = ["encoder", "backbone"]


def make_model(cfg_factory, kind: str, seed: int = 0, **kw) -> VideoLanguageModel:
    torch.manual_seed(seed)
    return VideoLanguageModel(cfg_factory(kind, **kw))


def inputs(b: int = 3, t: int = 4, length: int = 7, vocab: int = 100, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, 3, 32, 32, generator=g)
    frame_mask = torch.ones(b, t, dtype=torch.bool)
    frame_mask[0, t // 2:] = False          # one clip with padded frames
    ids = torch.randint(1, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 3:] = 0                # one caption with padding
    return frames, frame_mask, ids, mask


def fusion_params(model: VideoLanguageModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("fusion.") or ".cross_attn." in n}


def objective(model: VideoLanguageModel, **weights: float) -> TrainObjective:
    """The training objective with the given loss-term weights (default: VTC + VTM + MLM)."""
    return TrainObjective.from_spec(model, weights or {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0})


def mc_scores(m: VideoLanguageModel, frames, frame_mask, option_ids, option_mask) -> torch.Tensor:
    return m.option_scores(m.video_features(frames, frame_mask), option_ids, option_mask)


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("kind", KINDS)
def test_encode_shapes_unit_norm_score_and_answer(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind).eval()
    frames, fm, ids, mask = inputs()
    v = m.encode_video(frames, fm)
    t = m.encode_text(ids, mask)
    assert v.shape == (3, 16) and t.shape == (3, 16)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
    assert torch.equal(vf.emb, v) and torch.equal(tf.emb, t)
    assert m.score_pairs(vf, tf).shape == (3, 2)
    # select() builds row-aligned pairs: scoring a selection equals selecting the scores
    idx = torch.tensor([2, 0, 2, 1])
    torch.testing.assert_close(m.score_pairs(vf.select(idx), tf.select(idx)), m.score_pairs(vf, tf)[idx],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no QA head"):
        m.answer(vf, tf)
    m.set_num_answers(5)
    assert m.cfg.num_answers == 5
    assert m.eval().answer(vf, tf).shape == (3, 5)


def test_fusion_none_has_no_fusion_path(tiny_model_config):
    m = make_model(tiny_model_config, "none").eval()
    frames, fm, ids, mask = inputs()
    vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
    assert m.fusion is None and m.fused_dim == 0 and not fusion_params(m)
    with pytest.raises(ValueError, match="no fusion"):
        m.fuse(vf, tf)
    with pytest.raises(ValueError, match="open-ended QA needs a fusion model"):
        m.set_num_answers(3)


# ------------------------------------------------------------------------- EgoVLPv2 backbone fusion


def _upper(m: VideoLanguageModel, vf, tf, fuse: bool):
    """The fused top layers of both towers from the states entering them: in lockstep with
    cross-attention (fuse=True), or each tower on its own (fuse=False, the dual path)."""
    if fuse:
        v, t = run_lockstep(m, vf, tf)
        return v.x, t
    v = m.video.run_blocks(vf.lower, m.cfg.video.first_fused_layer)
    t = tf.lower
    for layer in m.text.layers[m.cfg.text.first_fused_layer:]:
        t = layer(t, tf.attention_mask)
    return v.x, t


def test_backbone_fusion_is_identity_at_init(tiny_model_config):
    m = make_model(tiny_model_config, "backbone").eval()
    assert m.cfg.video.first_fused_layer == 1 and m.cfg.text.first_fused_layer == 1
    gates = [m.video.blocks[1].cross_attn.gate, m.text.layers[1].cross_attn.gate]
    assert all(torch.equal(g, torch.zeros(1)) for g in gates)
    assert m.video.blocks[0].cross_attn is None and m.text.layers[0].cross_attn is None
    frames, fm, ids, mask = inputs()
    with torch.no_grad():
        vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
        fv, ft = _upper(m, vf, tf, fuse=True)
        dv, dt = _upper(m, vf, tf, fuse=False)
        assert torch.equal(fv, dv) and torch.equal(ft, dt)
        # fuse=False from `lower` reproduces the dual path exactly
        assert torch.equal(m.video.finalize(dv), vf.tokens) and torch.equal(dt, tf.tokens)
        assert torch.equal(m.fuse(vf, tf).text_tokens, tf.tokens)

        # gates are the only thing keeping the towers apart: scrambling every other cross-attention
        # weight changes nothing while the gates are 0 ...
        for name, p in fusion_params(m).items():
            if not name.endswith("gate"):
                p.add_(torch.randn_like(p))
        fv2, ft2 = _upper(m, vf, tf, fuse=True)
        assert torch.equal(fv2, dv) and torch.equal(ft2, dt)
        # ... and a nonzero gate makes fused differ from dual in both towers
        for g in gates:
            g.fill_(0.5)
        fv3, ft3 = _upper(m, vf, tf, fuse=True)
        assert not torch.allclose(fv3, dv, atol=1e-4) and not torch.allclose(ft3, dt, atol=1e-4)
        dv3, dt3 = _upper(m, vf, tf, fuse=False)
        assert torch.equal(dv3, dv) and torch.equal(dt3, dt)   # dual mode ignores gates


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_backbone_gates_leave_zero_after_one_fusion_step(tiny_model_config, optim):
    m = make_model(tiny_model_config, "backbone")
    frames, fm, ids, mask = inputs()
    vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
    # VTM: 3 positives (i, i) and 3 negatives (i, i+1)
    vi = torch.tensor([0, 1, 2, 0, 1, 2])
    ti = torch.tensor([0, 1, 2, 1, 2, 0])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    loss = F.cross_entropy(m.score_pairs(vf.select(vi), tf.select(ti)), labels)
    loss.backward()
    gates = {n: p for n, p in m.named_parameters() if n.endswith("gate")}
    assert sorted(gates) == ["text.layers.1.cross_attn.gate", "video.blocks.1.cross_attn.gate"]
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in gates.values())
    opt = torch.optim.SGD(m.parameters(), lr=1.0) if optim == "sgd" else torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.step()
    assert all(p.item() != 0 for p in gates.values())
    with torch.no_grad():
        vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
        fv, ft = _upper(m, vf, tf, fuse=True)
        dv, dt = _upper(m, vf, tf, fuse=False)
    assert not torch.equal(fv, dv) and not torch.equal(ft, dt)


@pytest.mark.parametrize("kind", KINDS)
def test_dual_path_ignores_fusion_parameters(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind).eval()
    frames, fm, ids, mask = inputs()
    with torch.no_grad():
        v0, t0 = m.encode_video(frames, fm), m.encode_text(ids, mask)
        s0 = m.score_pairs(m.video_features(frames, fm), m.text_features(ids, mask))
        params = fusion_params(m)
        assert params  # both kinds have fusion parameters
        for p in params.values():
            p.add_(torch.randn_like(p) + 1.0)   # includes the gates (backbone)
        for p in m.vtm_head.parameters():
            p.add_(1.0)
        assert torch.equal(m.encode_video(frames, fm), v0)
        assert torch.equal(m.encode_text(ids, mask), t0)
        s1 = m.score_pairs(m.video_features(frames, fm), m.text_features(ids, mask))
    assert not torch.allclose(s0, s1)   # the fusion path did see the change


# ------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(tiny_model_config, tmp_path, kind):
    m = make_model(tiny_model_config, kind)
    m.set_num_answers(4)
    with torch.no_grad():   # make the gates nonzero so they round-trip too
        for n, p in m.named_parameters():
            if n.endswith("gate"):
                p.fill_(0.25)
    m.eval()
    m.save_pretrained(tmp_path / "ck")
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"model.safetensors", "config.json"}
    m2 = VideoLanguageModel.from_pretrained(tmp_path / "ck").eval()
    assert m2.cfg == m.cfg and m2.cfg.num_answers == 4
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    frames, fm, ids, mask = inputs()
    with torch.no_grad():
        vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
        vf2, tf2 = m2.video_features(frames, fm), m2.text_features(ids, mask)
        assert torch.equal(vf.emb, vf2.emb) and torch.equal(tf.emb, tf2.emb)
        assert torch.equal(m.score_pairs(vf, tf), m2.score_pairs(vf2, tf2))
        assert torch.equal(m.answer(vf, tf), m2.answer(vf2, tf2))
    # the MLM decoder stays tied to the loaded word embeddings
    assert m2.mlm_head._words[0].weight is m2.text.embeddings.word_embeddings.weight


def test_from_pretrained_is_strict(tiny_model_config, tmp_path):
    m = make_model(tiny_model_config, "encoder")
    folder = m.save_pretrained(tmp_path / "ck")
    weights = folder / "model.safetensors"
    clean = load_file(str(weights))

    extra = dict(clean, **{"extra_head.weight": torch.zeros(2)})
    save_file(extra, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected in checkpoint \(1\): extra_head\.weight"):
        VideoLanguageModel.from_pretrained(folder)
    VideoLanguageModel.from_pretrained(folder, strict=False)   # non-strict keeps the matching tensors

    missing = {k: v for k, v in clean.items() if k != "vtm_head.bias"}
    save_file(missing, str(weights))
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \(1\): vtm_head\.bias"):
        VideoLanguageModel.from_pretrained(folder)

    wrong = dict(clean, **{"vtm_head.bias": torch.zeros(3)})
    save_file(wrong, str(weights))
    with pytest.raises(CheckpointError, match=r"vtm_head\.bias: file \(3,\) vs config \(2,\)"):
        VideoLanguageModel.from_pretrained(folder)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        VideoLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"recipe": {}}')
    with pytest.raises(CheckpointError, match="no 'model' section"):
        VideoLanguageModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ configs


def _video(layers=2):
    return VideoEncoderConfig(image_size=32, patch_size=16, tubelet_size=2, num_frames=4, hidden_size=32,
                              num_layers=layers, num_heads=2)


def _text(layers=2):
    return TextEncoderConfig(pretrained=None, vocab_size=100, hidden_size=32, num_layers=layers, num_heads=2,
                             intermediate_size=64, max_position_embeddings=64)


def test_model_config_fusion_depth_is_checked(tiny_model_dict_factory):
    with pytest.raises(ValueError, match=r"fusion.num_layers=3 exceeds video.num_layers=2"):
        ModelConfig(video=_video(2), text=_text(4), fusion=FusionConfig(kind="backbone", num_layers=3))
    with pytest.raises(ValueError, match=r"fusion.num_layers=2 exceeds text.num_layers=1"):
        ModelConfig(video=_video(2), text=_text(1), fusion=FusionConfig(kind="backbone", num_layers=2))
    # a separate cross-modal encoder may be deeper than the towers
    cfg = ModelConfig(video=_video(2), text=_text(1), fusion=FusionConfig(kind="encoder", num_layers=3))
    assert cfg.video.fusion_layers == 0 and cfg.text.fusion_layers == 0 and cfg.text.context_dim is None
    d = tiny_model_dict_factory("backbone")
    d["fusion"]["num_layers"] = 5
    with pytest.raises(ConfigError, match=r"model: fusion.num_layers=5 exceeds video.num_layers=2"):
        from_dict(ModelConfig, d, where="model")
    with pytest.raises(ValueError, match="fusion.num_layers must be >= 1"):
        FusionConfig(kind="backbone", num_layers=0)


def test_model_config_wires_backbone_fusion_and_round_trips(tiny_model_config):
    cfg = tiny_model_config("backbone")
    assert (cfg.video.fusion_layers, cfg.video.context_dim) == (1, 32)
    assert (cfg.text.fusion_layers, cfg.text.context_dim) == (1, 32)
    assert from_dict(ModelConfig, to_dict(cfg), where="model") == cfg
    enc = tiny_model_config("encoder")
    assert (enc.video.fusion_layers, enc.text.fusion_layers, enc.text.context_dim) == (0, 0, None)


def test_packaged_model_configs_parse():
    cfgs = {name: from_dict(ModelConfig, load_yaml(name, "models"), where=name)
            for name in ("tiny", "small", "base", "tiny-backbone")}
    assert cfgs["tiny"].fusion.kind == "encoder" and cfgs["tiny"].text.num_layers == 2
    assert (cfgs["tiny"].video.image_size, cfgs["tiny"].video.num_frames, cfgs["tiny"].video.hidden_size) == (64, 8, 192)
    tb = cfgs["tiny-backbone"]   # `base: tiny.yaml` + fusion override
    assert tb.fusion.kind == "backbone" and tb.fusion.num_layers == 2
    assert tb.video.hidden_size == 192 and tb.video.fusion_layers == 2 and tb.text.fusion_layers == 2
    assert tb.text.context_dim == 192 and tb.video.context_dim == 384
    assert cfgs["small"].video.num_frames == 8 and cfgs["small"].text.pretrained == "minilm"
    assert cfgs["base"].video.hidden_size == 768 and cfgs["base"].text.pretrained is None
    assert cfgs["base"].fusion.num_layers == 6


@pytest.mark.parametrize("name", ["tiny", "tiny-backbone"])
def test_packaged_tiny_models_build_and_run(name):
    m = build_model(load_yaml(name, "models")).eval()
    assert m.cfg.text.pretrained == "minilm"
    frames = torch.randn(1, 8, 3, 64, 64)
    ids = torch.tensor([[101, 1037, 2417, 4418, 102]])
    with torch.no_grad():
        vf, tf = m.video_features(frames), m.text_features(ids, torch.ones_like(ids))
        assert vf.emb.shape == (1, 256) and tf.emb.shape == (1, 256)
        assert m.score_pairs(vf, tf).shape == (1, 2)
    parts = count_parameters(m)
    assert parts["fusion"] > 0 and parts["total"] == sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------- efficiency


@pytest.mark.parametrize("kind", KINDS)
def test_count_parameters_parts_sum_to_total(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind)
    m.set_num_answers(3)
    parts = count_parameters(m)
    assert set(parts) == {"video", "text", "fusion", "heads", "total"}
    assert parts["total"] == parts["video"] + parts["text"] + parts["fusion"] + parts["heads"]
    assert parts["total"] == sum(p.numel() for p in m.parameters())
    assert parts["fusion"] == sum(p.numel() for p in fusion_params(m).values())
    if kind == "encoder":
        assert parts["fusion"] == sum(p.numel() for p in m.fusion.parameters())
        assert parts["video"] == sum(p.numel() for p in m.video.parameters())
    heads = [m.video_proj, m.text_proj, m.logit_scale, m.vtm_head, m.mlm_head, m.qa_head]
    assert parts["heads"] == sum(p.numel() for h in heads for p in h.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_gflops_scale_with_frames_and_fusion_costs_more(tiny_model_config, kind):
    # vocab 2000: see test_gflops_work_for_a_small_vocabulary for why not 100
    g4 = gflops_per_clip(make_model(tiny_model_config, kind, vocab_size=2000, num_frames=4), 4)
    g8 = gflops_per_clip(make_model(tiny_model_config, kind, vocab_size=2000, num_frames=8), 8)
    assert 1.9 <= g8["gflops_video"] / g4["gflops_video"] <= 2.5
    assert g8["gflops_text"] == g4["gflops_text"]
    for g in (g4, g8):
        assert g["gflops_dual"] == pytest.approx(g["gflops_video"] + g["gflops_text"], rel=1e-12)
        assert g["gflops_fusion"] > g["gflops_dual"] > 0
    m = make_model(tiny_model_config, "none", vocab_size=2000)
    assert gflops_per_clip(m, 4)["gflops_fusion"] is None


def _expected_video_flops(frames=4, image=32, patch=16, tube=2, d=32, layers=2, embed=16) -> int:
    """Matmul/conv FLOPs (2 per multiply-add) of the joint-attention video path incl. attention."""
    k = (frames // tube) * (image // patch) ** 2
    n = k + 1                                                       # + CLS
    conv = 2 * k * (3 * tube * patch * patch) * d
    per_layer = 2 * n * d * (3 * d + d + 8 * d) + 2 * 2 * n * n * d    # qkv+proj+mlp, QK^T and AV
    return conv + layers * per_layer + 2 * d * embed


def test_gflops_count_attention_exactly(tiny_model_config):
    m = make_model(tiny_model_config, "encoder", vocab_size=2000)
    assert gflops_per_clip(m, 4)["gflops_video"] * 1e9 == pytest.approx(_expected_video_flops(), rel=1e-9)


def test_gflops_work_for_a_small_vocabulary(tiny_model_config):
    g = gflops_per_clip(make_model(tiny_model_config, "encoder", vocab_size=100), 4)
    assert g["gflops_text"] > 0


# ---------------------------------------------------------------------------------- train objective


def train_batch(b: int = 4, t: int = 4, length: int = 8, vocab: int = 100, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    frames, fm, ids, mask = inputs(b, t, length, vocab, seed)
    mlm_ids = ids.clone()
    labels = torch.full_like(ids, -100)
    pos = torch.tensor([[0, 2], [1, 3], [2, 4], [0, 1]])[:b]
    for i, cols in enumerate(pos):
        labels[i, cols] = ids[i, cols]
        mlm_ids[i, cols] = 3                # stand-in [MASK] id
    return {"frames": frames, "frame_mask": fm, "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels,
            "verbs": [["roll"], ["roll"], ["spin"], ["grow"]][:b],
            "nouns": [["ball"], ["ball"], ["cube"], ["cube"]][:b],
            "answer_ids": torch.randint(0, 5, (b,), generator=g),
            "option_ids": torch.randint(1, vocab, (b, 3, length), generator=g),
            "option_mask": torch.ones(b, 3, length, dtype=torch.long),
            "answer_index": torch.randint(0, 3, (b,), generator=g)}


def _groups(m: VideoLanguageModel) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    named = list(m.named_parameters())
    fusion = fusion_params(m)
    return {
        "video": [(n, p) for n, p in named if n.startswith("video.") and n not in fusion],
        "text": [(n, p) for n, p in named if n.startswith("text.") and n not in fusion],
        "cross": list(fusion.items()),
        "heads": [(n, p) for n, p in named if n.split(".")[0] in ("video_proj", "text_proj", "vtm_head", "mlm_head",
                                                                   "logit_scale")],
    }


@pytest.mark.parametrize("kind", KINDS)
def test_train_objective_losses_and_gradients(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind)
    obj = objective(m)
    out = obj(train_batch())
    assert set(out) == {"loss", "vtc", "vtm", "mlm", "temperature"}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["loss"].item() == (out["vtc"] + out["vtm"] + out["mlm"]).item()
    assert out["temperature"].item() == pytest.approx(1 / m.logit_scale().item())
    assert out["vtm"].item() > 0 and out["vtc"].item() > 0
    assert out["mlm"].item() == pytest.approx(4.6052, abs=0.3)      # ~ ln(vocab=100)
    out["loss"].backward()
    for group, params in _groups(m).items():
        assert params, group
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params), f"no gradient reaches {group}"
    if kind == "backbone":   # at gate 0 only the gates can learn; the cross-attention weights wait for them
        grads = {n: p.grad for n, p in fusion_params(m).items()}
        assert all(g.abs().item() > 0 for n, g in grads.items() if n.endswith("gate"))


def test_train_objective_weights_select_objectives(tiny_model_config):
    m = make_model(tiny_model_config, "encoder")
    out = objective(m, vtc=2.0, vtm=0.5, mlm=0.0)(train_batch())
    assert set(out) == {"loss", "vtc", "vtm", "temperature"}
    assert out["loss"].item() == pytest.approx(2.0 * out["vtc"].item() + 0.5 * out["vtm"].item(), rel=1e-6)
    out = objective(m, vtc=0.0, egonce=1.0, vtm=0.0, mlm=0.0)(train_batch())
    assert set(out) == {"loss", "egonce", "temperature"} and torch.isfinite(out["loss"])


def test_train_objective_qa_and_mc(tiny_model_config):
    m = make_model(tiny_model_config, "encoder")
    m.set_num_answers(5)
    out = objective(m, vtc=0, vtm=0, mlm=0, qa=1)(train_batch())
    assert set(out) == {"loss", "qa"} and out["qa"].item() == pytest.approx(1.609, abs=0.3)   # ~ ln 5
    out = objective(m, vtc=0, vtm=0, mlm=0, mc=2.0)(train_batch())
    assert set(out) == {"loss", "mc"} and out["loss"].item() == pytest.approx(2.0 * out["mc"].item())


@pytest.mark.parametrize("kind", ["encoder", "backbone", "none"])
def test_multiple_choice_scores_shape_and_option_permutation(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind).eval()
    b = train_batch()
    with torch.no_grad():
        s = mc_scores(m, b["frames"], b["frame_mask"], b["option_ids"], b["option_mask"])
        perm = torch.tensor([2, 0, 1])
        sp = mc_scores(m, b["frames"], b["frame_mask"], b["option_ids"][:, perm], b["option_mask"][:, perm])
    assert s.shape == (4, 3) and torch.isfinite(s).all()
    torch.testing.assert_close(sp, s[:, perm], rtol=1e-5, atol=1e-5)
    if kind == "none":   # dual only: scaled cosine similarity
        v = m.encode_video(b["frames"], b["frame_mask"])
        t = m.encode_text(b["option_ids"].view(12, -1), b["option_mask"].view(12, -1)).view(4, 3, -1)
        torch.testing.assert_close(s, (v[:, None] * t).sum(-1) * m.logit_scale(), rtol=1e-5, atol=1e-5)


def test_objective_weights_validation(tiny_model_config):
    m = make_model(tiny_model_config, "encoder")
    with pytest.raises(ConfigError, match="every loss term has weight 0"):
        objective(m, vtc=0, vtm=0)
    with pytest.raises(ConfigError, match=r"objectives.vtm: the weight must be a finite number >= 0, got -1"):
        objective(m, vtm=-1)
    with pytest.raises(ConfigError, match=r"unknown loss term 'vtn'; did you mean 'vtm'\?"):
        objective(m, vtn=1)
    with pytest.raises(ConfigError, match=r"objectives.mlm: unknown option\(s\) mask_rate; this term takes: weight, mask_prob"):
        TrainObjective.from_spec(m, {"mlm": {"weight": 1, "mask_rate": 0.2}})
    with pytest.raises(ConfigError, match="objectives.vtm needs a fusion model"):
        objective(make_model(tiny_model_config, "none"))
    assert set(objective(make_model(tiny_model_config, "none"), vtc=1).terms) == {"vtc"}   # VTC alone is fine


def test_vtc_counts_captions_of_the_same_clip_as_positives(tiny_model_config):
    """Two captions of one clip in a batch are not each other's negatives: VTC becomes the
    multi-positive InfoNCE over the same-clip mask, and equals plain VTC when every clip is distinct."""
    from evl.losses.functional import egonce_loss, vtc_loss

    torch.manual_seed(0)
    m = make_model(tiny_model_config, "encoder")
    obj = objective(m, vtc=1)
    batch = train_batch()
    with torch.no_grad():
        v = m.video_features(batch["frames"], batch["frame_mask"]).emb
        t = m.text_features(batch["input_ids"], batch["attention_mask"]).emb
        scale = m.logit_scale()
        distinct = obj({**batch, "clip_keys": ["a", "b", "c", "d"]})["vtc"]
        shared = obj({**batch, "clip_keys": ["a", "a", "c", "d"]})["vtc"]
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert torch.allclose(distinct, vtc_loss(v, t, scale), atol=1e-6)
    assert torch.allclose(shared, egonce_loss(v, t, scale, positive_mask=same), atol=1e-6)
    assert not torch.allclose(shared, distinct)


@pytest.mark.parametrize("egonce", [0.0, 1.0])
def test_vtm_negatives_exclude_verb_noun_pairs_only_with_egonce(tiny_model_config, monkeypatch, egonce):
    """Rows 0 and 1 share verb and noun ("roll", "ball"): with EgoNCE on they are positives and never
    drawn as each other's VTM negatives; with EgoNCE off they are the hard negatives VTM should see."""
    import evl.losses.terms as terms

    seen = {}
    real = terms.sample_hard_negatives

    def spy(sim, positive_mask=None, generator=None):
        seen["mask"] = positive_mask.clone()
        return real(sim, positive_mask=positive_mask, generator=generator)

    monkeypatch.setattr(terms, "sample_hard_negatives", spy)
    m = make_model(tiny_model_config, "encoder")
    objective(m, vtc=1, vtm=1, mlm=0, egonce=egonce)({**train_batch(),
                                                                            "clip_keys": ["a", "b", "c", "d"]})
    assert bool(seen["mask"][0, 1]) == bool(egonce) and bool(seen["mask"][1, 0]) == bool(egonce)
    assert not seen["mask"][0, 2] and seen["mask"].diagonal().all()   # the pair itself is always excluded


# ------------------------------------------------------------------------------------------ fusion.dual_residual


def _with_dual_residual(m: VideoLanguageModel) -> VideoLanguageModel:
    """`m` rebuilt with fusion.dual_residual, every shared weight copied."""
    import dataclasses

    cfg = dataclasses.replace(m.cfg, fusion=dataclasses.replace(m.cfg.fusion, dual_residual=True))
    m2 = VideoLanguageModel(cfg)
    missing, unexpected = m2.load_state_dict(m.state_dict(), strict=False)
    assert sorted(missing) == ["dual_residual.bias", "dual_residual.weight"] and not unexpected
    return m2.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_dual_residual_starts_as_identity_and_adds_the_projected_product(tiny_model_config, kind):
    m = make_model(tiny_model_config, kind)
    m.set_num_answers(4)
    m.eval()
    m2 = _with_dual_residual(m)
    frames, fm, ids, mask = inputs()
    with torch.no_grad():
        vf, tf = m.video_features(frames, fm), m.text_features(ids, mask)
        # zero-initialised: the same matching logits and answers as without the option
        assert torch.equal(m2.score_pairs(vf, tf), m.score_pairs(vf, tf))
        assert torch.equal(m2.answer(vf, tf), m.answer(vf, tf))
        # with weights: pooled + W (v * t * embed_dim) + b, computed by hand
        w = torch.randn_like(m2.dual_residual.weight)
        m2.dual_residual.weight.copy_(w)
        m2.dual_residual.bias.fill_(0.5)
        expect = m.fuse(vf, tf).pooled + (vf.emb * tf.emb * 16) @ w.T + 0.5
        torch.testing.assert_close(m2.fuse(vf, tf).pooled, expect, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m2.score_pairs(vf, tf), m.score_pairs(vf, tf))


def test_dual_residual_trains_and_round_trips(tiny_model_config, tmp_path):
    m2 = _with_dual_residual(make_model(tiny_model_config, "encoder")).train()
    objective(m2, vtc=1.0, vtm=1.0)(train_batch())["loss"].backward()
    g = m2.dual_residual.weight.grad
    assert g is not None and torch.count_nonzero(g) > 0   # zero weights still get a gradient
    m2.save_pretrained(tmp_path / "ck")
    m3 = VideoLanguageModel.from_pretrained(tmp_path / "ck")
    assert m3.cfg.fusion.dual_residual and m3.cfg == m2.cfg
    assert torch.equal(m3.dual_residual.weight, m2.dual_residual.weight)


def test_dual_residual_needs_a_fusion(tiny_model_dict_factory):
    d = tiny_model_dict_factory("none")
    d["fusion"]["dual_residual"] = True
    with pytest.raises(ValueError, match="dual_residual needs a fusion"):
        from_dict(ModelConfig, d, where="model")


def test_dual_residual_draws_nothing_from_the_rng(tiny_model_config):
    """Building the option leaves every other weight, and the RNG state after the model, as without it."""
    import dataclasses

    cfg = tiny_model_config("encoder")
    torch.manual_seed(3)
    plain, after_plain = VideoLanguageModel(cfg).state_dict(), torch.rand(4)
    torch.manual_seed(3)
    with_it = VideoLanguageModel(dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, dual_residual=True)))
    assert torch.equal(torch.rand(4), after_plain)
    sd = with_it.state_dict()
    assert set(sd) - set(plain) == {"dual_residual.weight", "dual_residual.bias"}
    assert all(torch.equal(sd[k], v) for k, v in plain.items())
