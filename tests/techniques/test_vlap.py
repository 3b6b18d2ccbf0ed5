"""VLAP: frame selection (one per segment, temporal order, padding never picked, deterministic at
inference, straight-through gradient), the distillation map, the QFormer frame-QA model (features path ==
frames path), `evl vlap train` teacher → student → `evl vlap eval` → `evl ask`, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evl.cli import app
from evl.config import from_dict
from evl.errors import ConfigError
from evl.models.selection import topk_pick
from evl.techniques.vlap.frame_prompter import (
    FramePrompter,
    gumbel_pick,
    segment_ids,
    temperature_at,
    uniform_pick,
)
from evl.techniques.vlap.frame_qa import FrameQAConfig, FrameQAModel
from evl.techniques.vlap.qformer import TokenMap

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


# ------------------------------------------------------------------------------------------ selection


def test_segments_on_a_hand_computable_case():
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]]).bool()
    assert segment_ids(mask, 3).tolist() == [
        [0, 0, 0, 1, 1, 1, 2, 2],          # 8 real frames: floor(r·3/8)
        [0, 0, 1, 1, 2, -1, -1, -1],       # 5 real: floor(r·3/5)
        [-1, 0, 0, -1, 1, 1, 2, -1],       # real frames at 1,2,4,5,6 (ranks 0..4): padding inside a clip
        [0, 1, -1, -1, -1, -1, -1, -1],    # 2 real frames, 3 segments: only 2 are non-empty
    ]
    sel = uniform_pick(mask, 3)
    assert sel.index.tolist()[:3] == [[1, 4, 6], [0, 2, 4], [1, 4, 6]]
    assert sel.mask.tolist() == [[True] * 3] * 3 + [[True, True, False]]


def _check_one_per_segment(sel, mask, k):
    seg = segment_ids(mask, k)
    for b in range(mask.shape[0]):
        real = [i for i, ok in zip(sel.index[b].tolist(), sel.mask[b].tolist(), strict=True) if ok]
        assert real == sorted(real) and len(set(real)) == len(real)            # temporal order, no repeats
        assert all(mask[b, i] for i in real)                                    # padding never picked
        non_empty = sorted(set(seg[b][seg[b] >= 0].tolist()))
        assert [seg[b, i].item() for i in real] == non_empty                    # one per segment, in order
        assert len(real) == min(k, int(mask[b].sum()))


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_gumbel_pick_takes_exactly_one_real_frame_per_segment_in_temporal_order(k):
    g = torch.Generator().manual_seed(k)
    mask = torch.rand(6, 12, generator=g) > 0.3
    mask[0] = True
    mask[1, 3:] = False
    logits = torch.randn(6, 12, generator=g).masked_fill(~mask, float("-inf"))
    for training in (False, True):
        sel = gumbel_pick(logits, mask, k, temperature=0.5, training=training, generator=g)
        _check_one_per_segment(sel, mask, k)
        if training:   # the straight-through weights are the one-hot of the picks (forward value)
            one_hot = torch.zeros_like(sel.weights)
            rows = torch.arange(6)[:, None]
            one_hot[rows, torch.arange(k)[None], sel.index] = 1.0
            assert torch.allclose(sel.weights, one_hot * sel.mask[..., None], atol=1e-6)
    _check_one_per_segment(uniform_pick(mask, k), mask, k)


def test_inference_selection_is_deterministic_and_the_argmax_of_each_segment():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.2, 5.0, 0.0, 0.4, 0.8]])
    for _ in range(3):
        sel = gumbel_pick(logits, None, 2, training=False)
        assert sel.index.tolist() == [[1, 4]] and sel.weights is None


def test_straight_through_gradient_reaches_the_scorer():
    torch.manual_seed(0)
    prompter = FramePrompter(patch_dim=8, question_dim=6, width=16, question_aware=True)
    patches, question = torch.randn(3, 8, 4, 8), torch.randn(3, 6)
    frames = torch.randn(3, 8, 5)
    sel = gumbel_pick(prompter(patches, None, question), None, 2, temperature=1.0, training=True)
    picked = torch.einsum("bkn,bnd->bkd", sel.weights, frames)
    assert torch.allclose(picked, frames[torch.arange(3)[:, None], sel.index], atol=1e-6)   # forward: hard picks
    (picked * torch.randn_like(picked)).sum().backward()
    for name, p in prompter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_topk_localizer_keeps_the_best_real_frames_in_temporal_order():
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 7.0, 2.0], [5.0, 1.0, 9.0, 9.5, 9.9, 9.8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]).bool()
    sel = topk_pick(scores, mask, 3)
    assert sel.index.tolist() == [[1, 3, 4], [0, 1, 2]]    # padded 3,4,5 score highest and are never kept
    sel = topk_pick(scores, torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]).bool(), 3)
    assert sel.mask.tolist() == [[True, False, False], [True, True, False]]
    assert sel.index[0, 0].item() == 0 and sel.index[1, :2].tolist() == [2, 3]


def test_temperature_decays_exponentially_from_start_to_end():
    assert temperature_at(0.0, 1.0, 0.01) == pytest.approx(1.0)
    assert temperature_at(0.5, 1.0, 0.01) == pytest.approx(0.1)
    assert temperature_at(1.0, 1.0, 0.01) == pytest.approx(0.01)
    assert temperature_at(2.0, 1.0, 0.01) == pytest.approx(0.01)


@pytest.mark.parametrize(("k", "m", "n"), [(1, 1, 1), (2, 8, 16), (4, 3, 16), (3, 32, 7)])
def test_distillation_map_shapes(k, m, n):
    out = TokenMap(k * m, n * m, 12)(torch.randn(2, k * m, 12))
    assert out.shape == (2, n * m, 12)
    assert torch.allclose(out.mean(-1), torch.zeros(2, n * m), atol=1e-5)   # LayerNorm over the width


# ------------------------------------------------------------------------------------------ the model


def _cfg(tiny_model_dict_factory, select="prompter", k=3, n=8, **extra) -> FrameQAConfig:
    d = tiny_model_dict_factory()
    return from_dict(FrameQAConfig, {"video": d["video"], "text": d["text"], "num_candidates": n, "num_frames": k,
                                     "select": select, "num_answers": 5, "answerer_heads": 2,
                                     "qformer": {"hidden_size": 32, "num_queries": 3, "num_heads": 2}, **extra}, where="t")


@pytest.mark.parametrize("frame_input", ["frame", "tubelet"])
@pytest.mark.parametrize("select", ["all", "uniform", "prompter", "localizer"])
def test_features_path_equals_frames_path_and_padding_is_never_read(tiny_model_dict_factory, select, frame_input):
    torch.manual_seed(0)
    model = FrameQAModel(_cfg(tiny_model_dict_factory, select, frame_input=frame_input)).eval()
    frames = torch.randn(2, 8, 3, 32, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    ids, am = torch.randint(0, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    out = model(frames, mask, ids, am)
    again = model.from_features(model.frame_tokens(frames, None, mask), model.patch_embeddings(frames, mask), mask,
                                ids, am)
    assert torch.allclose(out.logits, again.logits, atol=1e-5)
    assert out.selection.index.tolist() == again.selection.index.tolist()
    assert all(mask[1, i] for i, ok in zip(out.selection.index[1].tolist(), out.selection.mask[1].tolist(), strict=True) if ok)
    # what a padded frame holds does not change the answer
    noisy = frames.clone()
    noisy[1, 5:] = 100.0
    assert torch.allclose(model(noisy, mask, ids, am).logits, out.logits, atol=1e-5)


def test_tubelet_input_fills_a_slot_with_the_next_frames_never_past_the_last_real_one(tiny_model_dict_factory):
    model = FrameQAModel(_cfg(tiny_model_dict_factory, "uniform", frame_input="tubelet"))
    t = model.cfg.video.tubelet_size
    assert t == 2
    frames = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(2, 6, 3, 2, 2).clone()   # frame n holds the value n
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    slots = model._slots(frames, torch.tensor([[0, 3, 5], [0, 3, 5]]), mask)
    assert slots.shape == (6, t, 3, 2, 2)
    assert slots[:, :, 0, 0, 0].tolist() == [[0, 1], [3, 4], [5, 5], [0, 1], [3, 3], [3, 3]]
    still = FrameQAModel(_cfg(tiny_model_dict_factory, "uniform"))._slots(frames, torch.tensor([[4], [1]]), mask)
    assert still[:, :, 0, 0, 0].tolist() == [[4, 4], [1, 1]]   # frame: the frame repeated, no motion
    with pytest.raises(ConfigError, match="frame_input"):
        _cfg(tiny_model_dict_factory, frame_input="pair")


def test_distinct_frame_sets_count_each_clips_different_selections():
    from evl.techniques.vlap.evaluate import distinct_sets_per_clip

    clips = ["a", "a", "a", "b", "b", "c"]
    picks = [[1, 2], [2, 1], [3, 4], [0, 1], [0, 1], [5, 6]]
    assert distinct_sets_per_clip(clips, picks) == 1.5     # a: 2 sets, b: 1 set; c has one question only
    assert distinct_sets_per_clip(["c"], [[0]]) is None


def test_frames_only_prompter_ignores_the_question(tiny_model_dict_factory):
    torch.manual_seed(0)
    model = FrameQAModel(_cfg(tiny_model_dict_factory, question_aware=False)).eval()
    patches = torch.randn(1, 8, 4, 32)
    a = model.prompter(patches, None, None)
    assert torch.equal(a, model.prompter(patches, None, torch.randn(1, 32)))
    assert not hasattr(model.prompter, "query")


def test_config_errors_name_the_values(tiny_model_dict_factory):
    from evl.errors import ConfigError

    with pytest.raises(ConfigError, match="num_frames=9 exceeds num_candidates=8"):
        _cfg(tiny_model_dict_factory, k=9)
    with pytest.raises(ConfigError, match="select: 'best'"):
        _cfg(tiny_model_dict_factory, select="best")
    assert _cfg(tiny_model_dict_factory, select="all", k=2).num_frames == 8


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def base(untrained_checkpoint):
    return untrained_checkpoint


def _recipe(tmp_path: Path, synthvl: Path, name: str, **extra) -> Path:
    ann = synthvl / "annotations"
    data = {"model": {"num_candidates": 6, "qformer": {"hidden_size": 32, "num_queries": 2, "num_heads": 2},
                      "answerer_heads": 2, "answerer_layers": 1, **extra.pop("model", {})},
            "data": {"train": str(ann / "qa_train.json"), "test": str(ann / "qa_test.json"),
                     "videos": str(synthvl / "videos")},
            "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "ckpt_every": 0, "log_every": 1,
                      "out_dir": str(tmp_path / name)},
            "feature_cache": str(tmp_path / "features")}
    data.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(args: list[str]):
    result = runner.invoke(app, args)
    return result


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _json(result) -> dict:
    """The JSON object a command printed (log lines on stderr come first in the mixed output)."""
    out = _ok(result)
    return json.loads(out if out.startswith("{") else out[out.index("\n{") + 1:])


def _error(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthvl, base):
    tmp = tmp_path_factory.mktemp("teacher")
    summary = _json(_invoke(["vlap", "train", str(_recipe(tmp, synthvl, "teacher", backbone=str(base),
                                                                    model={"select": "all"}))]))
    assert summary["steps"] == 3 and 0 <= summary["test"]["qa_accuracy"] <= 100
    assert summary["test"]["frames_read"] == 6
    return Path(summary["checkpoint"])


def test_teacher_then_prompter_student_with_distillation_then_eval_and_ask(tmp_path, synthvl, teacher):
    summary = _json(_invoke(["vlap", "train", str(_recipe(
        tmp_path, synthvl, "student", init=str(teacher), teacher=str(teacher), distill=0.01,
        model={"select": "prompter", "num_frames": 2}))]))
    assert set(summary["final_losses"]) >= {"answer", "distill", "temperature"}
    assert summary["test"]["frames_read"] == 2
    ckpt = Path(summary["checkpoint"])
    model = FrameQAModel.from_pretrained(ckpt)
    assert model.cfg.select == "prompter" and model.cfg.num_frames == 2 and model.prompter is not None
    # the student starts from the teacher: its towers are the teacher's, unchanged (frozen)
    t = FrameQAModel.from_pretrained(teacher)
    assert all(torch.equal(a, b) for a, b in zip(model.video.state_dict().values(), t.video.state_dict().values(), strict=True))

    metrics = _json(_invoke(["vlap", "eval", str(ckpt), "--data", str(synthvl / "annotations" / "qa_test.json"),
                                      "--videos", str(synthvl / "videos"), "--json"]))
    assert metrics["qa_accuracy"] == pytest.approx(summary["test"]["qa_accuracy"])
    assert set(metrics["per_type"]) <= {"attribute", "action", "count", "temporal", "existence"}

    video = next((synthvl / "videos").glob("*.mp4"))
    out = _json(_invoke(["ask", str(video), "what colour is the square?", "--model", str(ckpt), "--json"]))
    vocab = FrameQAModel.read_vocab(ckpt)
    assert out["answer"] in vocab.answers and 0 < out["score"] <= 1
    assert len(out["alternatives"]) == 4 and all(s <= out["score"] for _, s in out["alternatives"])
    assert len(out["frames"]) == 2 and out["frames"][0]["candidate"] < out["frames"][1]["candidate"]
    assert all(f["time_s"] is not None and f["time_s"] >= 0 for f in out["frames"])
    text = _ok(_invoke(["ask", str(video), "what colour is the square?", "--model", str(ckpt)]))
    assert text.startswith(f"answer: {out['answer']}") and "frames read: #" in text
    import evl

    loaded = evl.load(ckpt)
    assert loaded.kind == "frame_qa" and loaded.can("answer") and not loaded.can("encode_text")
    direct = loaded.answer(video, "what colour is the square?")
    assert (direct.answer, direct.frames) == (out["answer"], out["frames"])
    with pytest.raises(ConfigError, match="cannot encode_video"):
        loaded.encode_video(video)


def test_localizer_baseline_trains_on_the_teachers_pseudo_labels(tmp_path, synthvl, teacher):
    summary = _json(_invoke(["vlap", "train", str(_recipe(
        tmp_path, synthvl, "loc", init=str(teacher), teacher=str(teacher), model={"select": "localizer", "num_frames": 2}))]))
    assert {"answer", "localizer", "positive_frames"} <= set(summary["final_losses"])
    assert 0 <= summary["final_losses"]["positive_frames"] <= 1
    model = FrameQAModel.from_pretrained(summary["checkpoint"])
    assert model.localizer is not None and summary["test"]["frames_read"] == 2


def test_pseudo_labels_mark_the_frames_the_teacher_answers_from(tiny_model_dict_factory):
    from evl.techniques.vlap.train import pseudo_labels

    torch.manual_seed(0)
    t = FrameQAModel(_cfg(tiny_model_dict_factory, "all", n=4)).eval()
    tokens = torch.randn(2, 4, 5, 32)
    batch = {"tokens": tokens, "frame_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool(),
             "input_ids": torch.randint(0, 100, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    from evl.models.selection import Selection

    q = t.question_features(batch["input_ids"], batch["attention_mask"])
    single = [[t.read(tokens[b:b + 1, n:n + 1], Selection(torch.tensor([[n]]), torch.tensor([[True]])), q[b:b + 1],
                      batch["attention_mask"][b:b + 1]).logits.argmax().item() for n in range(4)] for b in range(2)]
    batch["answer_ids"] = torch.tensor([single[0][2], single[1][3]])
    labels = pseudo_labels(t, batch)
    expected = [[float(single[b][n] == batch["answer_ids"][b].item() and batch["frame_mask"][b, n].item())
                 for n in range(4)] for b in range(2)]
    assert labels.tolist() == expected and labels[0, 2] == 1.0 and labels[1, 3] == 0.0   # padding never positive


def test_user_errors_are_clear(tmp_path, synthvl, teacher, base):
    assert "needs backbone=" in _error(_invoke(["vlap", "train", str(_recipe(tmp_path, synthvl, "x"))]))
    assert "no config.json" in _error(_invoke(["vlap", "train", str(_recipe(tmp_path, synthvl, "x", backbone=str(tmp_path)))]))
    student = _recipe(tmp_path, synthvl, "s", backbone=str(base), model={"select": "uniform", "num_frames": 2})
    first = _json(_invoke(["vlap", "train", str(student)]))
    bad_teacher = _recipe(tmp_path, synthvl, "y", init=str(teacher), teacher=first["checkpoint"],
                          model={"select": "prompter", "num_frames": 2})
    assert "the teacher must read all N (select=all)" in _error(_invoke(["vlap", "train", str(bad_teacher)]))
    other_n = _recipe(tmp_path, synthvl, "z", backbone=str(base), teacher=str(teacher),
                      model={"select": "prompter", "num_frames": 2, "num_candidates": 4})
    assert "num_candidates=6" in _error(_invoke(["vlap", "train", str(other_n)]))
    moving = _recipe(tmp_path, synthvl, "m", init=str(teacher), model={"select": "uniform", "num_frames": 2,
                                                                      "frame_input": "tubelet"})
    assert "frame_input='frame'" in _error(_invoke(["vlap", "train", str(moving)]))
    assert "needs teacher=" in _error(_invoke(["vlap", "train", str(_recipe(
        tmp_path, synthvl, "w", backbone=str(base), model={"select": "localizer", "num_frames": 2}))]))
    video = next((synthvl / "videos").glob("*.mp4"))
    assert "question is empty" in _error(_invoke(["ask", str(video), "  ", "--model", str(teacher)]))
    missing = _error(_invoke(["ask", str(tmp_path / "nope.mp4"), "what?", "--model", str(teacher)]))
    assert "nope.mp4" in missing
    assert "cannot answer" in _error(_invoke(["ask", str(video), "what?", "--model", str(base)]))


def test_multiple_choice_scores_each_option_as_the_question(tmp_path, synthvl, base):
    ann = synthvl / "annotations"
    recipe = _recipe(tmp_path, synthvl, "mc", backbone=str(base), task="mc",
                     data={"train": str(ann / "mc_train.json"), "test": str(ann / "mc_test.json"),
                           "videos": str(synthvl / "videos")}, model={"select": "uniform", "num_frames": 2})
    summary = _json(_invoke(["vlap", "train", str(recipe)]))
    assert 0 <= summary["test"]["mc_accuracy"] <= 100 and summary["test"]["frames_read"] == 2
    ckpt = summary["checkpoint"]
    assert not (Path(ckpt) / "answers.json").exists()
    video = next((synthvl / "videos").glob("*.mp4"))
    assert "not trained on open-ended QA" in _error(_invoke(["ask", str(video), "what?", "--model", ckpt]))


def test_distill_loss_skips_the_teachers_padded_frames():
    from evl.losses.functional import distill_loss

    s, t = torch.zeros(1, 4, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0], [9.0, 9.0]]])
    assert distill_loss(s, t, mask=torch.tensor([[1, 1, 0, 0]])).item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert distill_loss(s, t).item() == pytest.approx((2 + 8 + 162 + 162) / 8)


def test_a_prompter_model_is_not_trained_from_frames(tiny_model_dict_factory):
    model = FrameQAModel(_cfg(tiny_model_dict_factory)).train()
    with pytest.raises(RuntimeError, match="from_features"):
        model(torch.randn(1, 8, 3, 32, 32), None, torch.randint(0, 100, (1, 4)), torch.ones(1, 4, dtype=torch.long))


def test_videos_folder_is_guessed_and_the_teacher_must_share_the_towers(tmp_path, synthvl, teacher, base,
                                                                         tiny_model_dict_factory):
    from evl.models.model import build_model

    recipe = _recipe(tmp_path, synthvl, "guess", backbone=str(base), model={"select": "uniform", "num_frames": 2})
    data = yaml.safe_load(recipe.read_text())
    del data["data"]["videos"]                       # the annotation's sibling videos/ folder is found
    recipe.write_text(yaml.safe_dump(data))
    assert _json(_invoke(["vlap", "train", str(recipe)]))["test"]["count"] > 0
    torch.manual_seed(1)
    other = tmp_path / "other_backbone"
    build_model(tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)).save_pretrained(other)
    mixed = _recipe(tmp_path, synthvl, "mixed", backbone=str(other), teacher=str(teacher), distill=0.01,
                    model={"select": "prompter", "num_frames": 2})
    assert "other tower weights" in _error(_invoke(["vlap", "train", str(mixed)]))
    lonely = _recipe(tmp_path, synthvl, "lonely", backbone=str(base), distill=0.01, model={"select": "prompter"})
    assert "needs teacher=" in _error(_invoke(["vlap", "train", str(lonely)]))
    assert "init= instead" in _error(_invoke(["vlap", "train", str(_recipe(tmp_path, synthvl, "bb", backbone=str(teacher)))]))
    wrong_task = _invoke(["vlap", "eval", str(teacher), "--data", str(synthvl / "annotations" / "qa_test.json"), "--task", "mc"])
    assert "trained for task qa" in _error(wrong_task)
