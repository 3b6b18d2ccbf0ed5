"""E-ViLM: the VQ tokenizer's quantizer (straight-through, EMA, k-means init, dead-code restart), masked
video modelling on its codes, `evl vq train` → `evl pretrain` with MVM → `evl eval` without the tokenizer,
and the errors a user can cause."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from evl.cli import app
from evl.techniques.evilm.vq_tokenizer import NormEMAQuantizer, VQTokenizer, VQTokenizerConfig, cosine_kmeans

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


# ------------------------------------------------------------------------------------------ quantizer


def _quantizer(codebook: list[list[float]], decay: float = 0.5, restart_dead: float = 0.0) -> NormEMAQuantizer:
    q = NormEMAQuantizer(len(codebook), len(codebook[0]), decay=decay, restart_dead=restart_dead)
    q.codebook.copy_(F.normalize(torch.tensor(codebook), dim=1))
    q.initialized.fill_(True)
    return q


def test_straight_through_gradient_is_the_identity_through_the_lookup():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]]).eval()
    z = torch.tensor([[3.0, 1.0], [0.5, 2.0]], requires_grad=True)
    out = q(z)
    assert out.codes.tolist() == [0, 1]
    assert torch.allclose(out.quantized, q.codebook[out.codes])   # forward: the code vectors
    w = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    (grad,) = torch.autograd.grad((out.quantized * w).sum(), z)
    (expected,) = torch.autograd.grad((F.normalize(z, dim=1) * w).sum(), z)
    assert torch.allclose(grad, expected)   # backward: as if there were no quantizer
    # commitment loss: mean squared distance of the unit inputs to their codes
    flat = F.normalize(z.detach(), dim=1)
    assert out.commit_loss.item() == pytest.approx(((flat - q.codebook[[0, 1]]) ** 2).mean().item())


def test_ema_update_on_a_hand_computable_case():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]], decay=0.5).train()
    out = q(torch.tensor([[3.0, 1.0]]))            # unit input (3, 1)/√10 → code 0 (cos 0.95 > 0.32)
    assert out.codes.tolist() == [0]
    x = torch.tensor([3.0, 1.0]) / math.sqrt(10)
    expected0 = 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * x
    assert torch.allclose(q.codebook[0], expected0 / expected0.norm(), atol=1e-6)
    assert q.codebook[1].tolist() == [0.0, 1.0]    # unused: keeps its vector
    assert q.cluster_size.tolist() == [0.5, 0.0]
    assert out.used.item() == 0.5 and out.perplexity.item() == pytest.approx(1.0)
    q.eval()
    before = q.codebook.clone()
    q(torch.tensor([[0.0, 1.0]]))
    assert torch.equal(q.codebook, before)         # no update outside training


def test_kmeans_init_on_the_first_training_batch_only():
    points = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    q = NormEMAQuantizer(3, 2, decay=0.99).train()
    assert not bool(q.initialized)
    q(points)
    # as many points as codes: k-means starts from the points and each stays its own cluster; the first
    # EMA step then moves every code towards the one point it holds, i.e. not at all
    got = sorted(map(tuple, q.codebook.round(decimals=5).tolist()))
    assert got == sorted(map(tuple, points.round(decimals=5).tolist()))
    assert bool(q.initialized)
    q(torch.tensor([[5.0, 5.0]]))                  # a later batch does not re-initialise
    assert sorted(map(tuple, q.codebook.round(decimals=5).tolist()))[0] == got[0]


def test_cosine_kmeans_assigns_by_angle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = F.normalize(torch.stack([a, a * 2, b, b * 3, a + 0.01 * b]), dim=1)
    c = cosine_kmeans(x, 2, iters=5, generator=torch.Generator().manual_seed(1))
    assign = (x @ c.T).argmax(dim=1).tolist()
    assert assign[0] == assign[1] == assign[4] != assign[2] == assign[3]


def test_dead_codes_are_restarted_from_batch_inputs_when_asked():
    book = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
    inputs = torch.tensor([[1.0, 0.1], [1.0, -0.1]])
    plain = _quantizer(book, decay=0.5).train()
    plain(inputs)
    assert plain.codebook[1:].tolist() == F.normalize(torch.tensor(book[1:]), dim=1).tolist()   # BEiT-v2: kept
    restart = _quantizer(book, decay=0.5, restart_dead=0.25).train()
    restart(inputs)
    unit = F.normalize(inputs, dim=1)
    for row in restart.codebook[1:]:               # the three unused codes now sit on batch inputs
        assert any(torch.allclose(row, u) for u in unit)
    assert restart.cluster_size.tolist() == [1.0, 0.25, 0.25, 0.25]


# ------------------------------------------------------------------------------------------ tokenizer


def _tokenizer_cfg(video: dict, **kw) -> VQTokenizerConfig:
    from evl.config import from_dict

    return from_dict(VQTokenizerConfig, {"video": video, "num_codes": 8, "code_dim": 4, "target_dim": 12, **kw})


def test_codes_are_deterministic_and_survive_saving(tmp_path, tiny_model_dict_factory):
    tok = VQTokenizer(_tokenizer_cfg(tiny_model_dict_factory()["video"])).train()
    frames = torch.randn(2, 4, 3, 32, 32)
    tok(frames, torch.randn(2, 8, 12))             # k-means init + one EMA step
    codes = tok.encode(frames)
    assert codes.shape == (2, 8) and codes.dtype == torch.long and bool((codes < 8).all())
    assert torch.equal(tok.encode(frames), codes)
    tok.save_pretrained(tmp_path / "tok", metadata={"usage": {"perplexity": 3.0}})
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(loaded.encode(frames), codes)
    assert loaded.metadata["usage"] == {"perplexity": 3.0}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()                                 # frozen: stays in eval mode (no EMA updates)
    assert not loaded.training


def test_mvm_masks_are_exact_blockwise_tubes_and_seeded():
    from evl.models.masking import num_masked
    from evl.techniques.smaug.mae import MaskVideo

    batch = {"frames": torch.zeros(3, 8, 3, 64, 64), "sample_seeds": torch.tensor([5, 6, 5])}
    out = MaskVideo(16, 2, 0.4, "blockwise", shared=False, key="mvm_hidden", salt=7, min_block=4)(batch)
    mask = out["mvm_hidden"].view(3, 4, 16)
    assert "video_keep_index" not in out
    assert (mask.sum(dim=2) == num_masked(16, 0.4)).all()        # exact count in every slot
    assert (mask == mask[:, :1]).all()                            # a tube: the same blocks in every slot
    assert torch.equal(mask[0], mask[2]) and not torch.equal(mask[0], mask[1])   # per-sample seed


def test_mvm_loss_reads_masked_positions_only(tiny_model_config, monkeypatch):
    from evl.losses.step import StepCache
    from evl.losses.terms import TermContext
    from evl.models.model import VideoLanguageModel
    from evl.techniques.evilm.mvm import MVMTerm

    cfg = tiny_model_config()
    model = VideoLanguageModel(cfg)
    term = MVMTerm(TermContext(cfg), target="pixel", mask="random", mask_ratio=0.5)
    frames = torch.randn(2, 4, 3, 32, 32)
    batch = term.batch_transforms()[0]({"frames": frames, "sample_seeds": torch.tensor([1, 2])})
    mask = batch["mvm_hidden"]
    assert mask.sum().item() == 2 * 4
    target = torch.randn(2, 8, 2 * 16 * 16 * 3)
    monkeypatch.setattr(term, "targets", lambda f: target)
    step = StepCache(model, batch, {**term.features()})
    loss = term(step)
    video = step["masked_video"]
    expected = F.mse_loss(term.head(video.tokens[:, 1:][mask]), target[mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    target[~mask] = 1e6                            # unmasked targets do not matter
    assert term(StepCache(model, batch, {**term.features()})).item() == pytest.approx(loss.item(), rel=1e-6)
    # masked tubelets enter as the mask token: changing their pixels changes nothing the model sees
    changed = frames.clone()
    for b, n in mask.nonzero().tolist():
        slot, rest = divmod(n, 4)
        row, col = divmod(rest, 2)
        changed[b, 2 * slot:2 * slot + 2, :, 16 * row:16 * row + 16, 16 * col:16 * col + 16] = 9.0
    model.eval()
    step_a = StepCache(model, {**batch, "frames": frames}, {**term.features()})
    step_b = StepCache(model, {**batch, "frames": changed}, {**term.features()})
    assert torch.allclose(step_a["masked_video"].tokens, step_b["masked_video"].tokens, atol=1e-6)


# ------------------------------------------------------------------------------- commands end to end


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _model(tiny_model_dict_factory) -> dict:
    return tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)


def _data(synthvl: Path) -> dict:
    return {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")}


def _train(**kw) -> dict:
    return {"max_steps": 2, "batch_size": 4, "precision": "fp32", "log_every": 1, **kw}


def _invoke(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthvl, tiny_model_dict_factory):
    out = tmp_path_factory.mktemp("teacher")
    recipe = _write(out / "pre.yaml", {"task": "pretrain", "model": _model(tiny_model_dict_factory),
                                       "objectives": {"vtc": 1.0}, "data": _data(synthvl),
                                       "train": _train(out_dir=str(out / "run"))})
    result = _invoke(["pretrain", str(recipe), "--no-eval"])
    assert result.exit_code == 0, result.output
    return out / "run" / "final"


def _vq_recipe(tmp_path: Path, synthvl: Path, video: dict, teacher: Path | None, **tok) -> Path:
    return _write(tmp_path / "vq.yaml", {
        "tokenizer": {"video": video, "num_codes": 16, "code_dim": 8, "decoder_layers": 1, **tok},
        "teacher": str(teacher) if teacher else None, "data": _data(synthvl), "usage_clips": 8,
        "train": _train(max_steps=3, out_dir=str(tmp_path / "vq"))})


def test_vq_train_then_pretrain_with_mvm_then_eval_without_the_tokenizer(tmp_path, synthvl, teacher,
                                                                        tiny_model_dict_factory):
    model = _model(tiny_model_dict_factory)
    result = _invoke(["vq", "train", str(_vq_recipe(tmp_path, synthvl, model["video"], teacher))])
    assert result.exit_code == 0, result.output
    final = tmp_path / "vq" / "final"
    saved = json.loads((final / "config.json").read_text())
    usage = saved["metadata"]["usage"]
    assert usage["clips"] == 8 and usage["num_codes"] == 16 and 1 <= usage["codes_used"] <= 16
    assert 0 < usage["fraction_used"] <= 1 and 1.0 <= usage["perplexity"] <= 16
    assert saved["tokenizer"]["target_dim"] == model["video"]["hidden_size"]   # the teacher's width
    log = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()]
    assert {"rec", "commit", "perplexity", "codes_used"} <= set(log[-1])

    tokenizer = tmp_path / "tok"
    shutil.copytree(final, tokenizer)
    recipe = _write(tmp_path / "evilm.yaml", {
        "task": "pretrain", "model": model, "data": _data(synthvl), "train": _train(out_dir=str(tmp_path / "run")),
        "objectives": {"vtc": 1.0, "mlm": 1.0,
                       "mvm": {"weight": 1.0, "target": "codes", "tokenizer": str(tokenizer), "mask_ratio": 0.5}}})
    result = _invoke(["pretrain", str(recipe), "--no-eval"])
    assert result.exit_code == 0, result.output
    losses = json.loads(result.output[result.output.index("{\n"):])["final_losses"]
    assert math.isfinite(losses["mvm"]) and losses["mvm"] > 0
    shutil.rmtree(tokenizer)                       # evaluation needs the model only
    result = _invoke(["eval", str(tmp_path / "run" / "final"), "--task", "retrieval", "--data",
                      str(synthvl / "annotations" / "retrieval_test.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert "t2v_r1" in json.loads(result.output[result.output.index("{"):])


def test_pixel_vq_vae_variant_and_pixel_mvm(tmp_path, synthvl, tiny_model_dict_factory):
    model = _model(tiny_model_dict_factory)
    result = _invoke(["vq", "train", str(_vq_recipe(tmp_path, synthvl, model["video"], None, target="pixel"))])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "vq" / "final" / "config.json").read_text())
    assert saved["tokenizer"]["target"] == "pixel" and saved["tokenizer"]["target_dim"] == 2 * 16 * 16 * 3
    recipe = _write(tmp_path / "p.yaml", {"task": "pretrain", "model": model, "data": _data(synthvl),
                                          "train": _train(out_dir=str(tmp_path / "run")),
                                          "objectives": {"vtc": 1.0, "mvm": {"target": "pixel"}}})
    assert _invoke(["pretrain", str(recipe), "--no-eval"]).exit_code == 0


# ------------------------------------------------------------------------------------------ bad input


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    return result.output


def test_a_tokenizer_cut_differently_from_the_model_is_refused_before_training(tmp_path, synthvl, teacher,
                                                                              tiny_model_dict_factory, monkeypatch):
    from evl.train.trainer import Trainer

    model = _model(tiny_model_dict_factory)
    other = dict(model["video"], patch_size=8)
    tok = VQTokenizer(_tokenizer_cfg(other))
    tok.save_pretrained(tmp_path / "tok")

    def never(*a, **k):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Trainer, "_train_step", never)
    recipe = _write(tmp_path / "r.yaml", {"task": "pretrain", "model": model, "data": _data(synthvl),
                                          "train": _train(out_dir=str(tmp_path / "run")),
                                          "objectives": {"vtc": 1.0, "mvm": {"tokenizer": str(tmp_path / "tok")}}})
    out = _error(_invoke(["pretrain", str(recipe), "--no-eval"]))
    assert "the tokenizer has video.patch_size=8 but the model has video.patch_size=16" in out
    frames = dict(model["video"], num_frames=8)
    VQTokenizer(_tokenizer_cfg(frames)).save_pretrained(tmp_path / "tok")
    assert "video.num_frames=8 but the model has video.num_frames=4" in _error(
        _invoke(["pretrain", str(recipe), "--no-eval"]))
    # the teacher: missing, cut differently, or of another width than asked
    vq = _vq_recipe(tmp_path, synthvl, model["video"], tmp_path / "nope")
    assert "teacher=" in _error(_invoke(["vq", "train", str(vq)])) and "no config.json" in _error(
        _invoke(["vq", "train", str(vq)]))
    vq = _vq_recipe(tmp_path, synthvl, frames, teacher)
    assert "the tokenizer has video.num_frames=8 but the teacher has video.num_frames=4" in _error(
        _invoke(["vq", "train", str(vq)]))
    vq = _vq_recipe(tmp_path, synthvl, model["video"], teacher, target_dim=99)
    assert "tokenizer.target_dim=99 but the teacher" in _error(_invoke(["vq", "train", str(vq)]))
    assert "target=codes needs tokenizer" in _error(_invoke(["pretrain", str(_write(tmp_path / "n.yaml", {
        "task": "pretrain", "model": model, "data": _data(synthvl), "train": _train(out_dir=str(tmp_path / "r2")),
        "objectives": {"vtc": 1.0, "mvm": {"target": "codes"}}})), "--no-eval"]))
