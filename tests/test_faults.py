"""Fault injection: every failure a user can cause gets a clear error before work is spent (issue 13).

One test per defect found by trying evl as a new user and as an adversary would, plus the cases that
already held (they stay here so they keep holding). Runs are tiny: 12 SynthVL clips, batch 4, fp32.
The SIGKILL-during-checkpoint case is tests/test_resume_cli.py; the soak version is
benchmarks/soak_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli_checks import error_line, invoke
from evl.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def _recipe(tmp_path: Path, synthvl: Path, model: dict, **train) -> Path:
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump({
        "task": "pretrain", "model": model, "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "log_every": 1, "lr": 1e-3,
                  "out_dir": str(tmp_path / "run"), **train}}))
    return path


@pytest.fixture
def model(tiny_model_dict_factory):
    return tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)


def _pretrain(recipe: Path, *args: str):
    return invoke(["pretrain", recipe, "--no-eval", *args])


_error = error_line


# ------------------------------------------------------------------ 1. a fresh run into a used out_dir


def test_fresh_run_into_a_used_out_dir_refuses_and_keeps_the_old_run(tmp_path, synthvl, model):
    from evl.train.state import latest_checkpoint

    recipe = _recipe(tmp_path, synthvl, model, ckpt_every=1)
    assert _pretrain(recipe).exit_code == 0
    run = tmp_path / "run"
    before = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    final = (run / "final" / "model.safetensors").read_bytes()
    message = _error(_pretrain(recipe, "train.max_steps=1"))
    assert f"train.out_dir={run} holds another run's checkpoints" in message
    assert "--resume" in message and "train.overwrite=true" in message
    # the old run is intact and resumable
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == before == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(run).name == "step_00000003"
    assert (run / "final" / "model.safetensors").read_bytes() == final
    # an explicit overwrite starts over: the old checkpoints are gone, latest points at the new one
    assert _pretrain(recipe, "train.max_steps=1", "train.overwrite=true").exit_code == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert latest_checkpoint(run).name == "step_00000001"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_pruning_never_deletes_the_checkpoint_latest_points_to(tmp_path):
    from evl.train.state import _prune

    root = tmp_path / "checkpoints"
    for step in (7, 8, 1):
        (root / f"step_{step:08d}").mkdir(parents=True)
    _prune(root, keep_last=1, current=root / "step_00000001")
    assert (root / "step_00000001").is_dir()   # just written, though its number is the lowest
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000008"]


def test_resume_past_max_steps_refuses_and_keeps_final(tmp_path, synthvl, model):
    recipe = _recipe(tmp_path, synthvl, model)
    assert _pretrain(recipe).exit_code == 0
    final = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    message = _error(_pretrain(recipe, "train.max_steps=1", "--resume"))
    assert "is at step 3, past train.max_steps=1; nothing was written" in message
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == final


# ------------------------------------------------------------------ 2. unreadable videos


def test_wrong_videos_folder_stops_before_training(tmp_path, synthvl, model):
    message = _error(_pretrain(_recipe(tmp_path, synthvl, model), "data.videos=/nonexistent"))
    assert "exists under the videos folder /nonexistent" in message
    assert "/nonexistent/clip_00000.mp4" in message and "evl data check" in message
    assert not (tmp_path / "run" / "final").exists()


def test_every_video_undecodable_stops_with_an_error_and_no_final(tmp_path, synthvl, model):
    videos = tmp_path / "videos"
    videos.mkdir()
    for f in (synthvl / "videos").iterdir():
        (videos / f.name).write_bytes(b"not a video at all " * 10)
    result = _pretrain(_recipe(tmp_path, synthvl, model, max_steps=20), f"data.videos={videos}")
    message = _error(result)
    assert "3 steps in a row had no video that decodes" in message and "evl data check" in message
    assert not (tmp_path / "run" / "final").exists()


def test_a_high_skip_rate_warns_loudly(tmp_path, synthvl, model):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, f in enumerate(sorted((synthvl / "videos").iterdir())):
        (videos / f.name).write_bytes(f.read_bytes() if i % 2 else b"garbage")
    result = _pretrain(_recipe(tmp_path, synthvl, model, max_steps=3), f"data.videos={videos}")
    assert result.exit_code == 0, result.output
    assert "WARNING:" in result.output and "could not be decoded" in result.output


def test_data_check_exit_status_gates_a_script(tmp_path, synthvl):
    ann = str(synthvl / "annotations" / "pretrain.json")
    assert runner.invoke(app, ["data", "check", ann]).exit_code == 0
    bad = runner.invoke(app, ["data", "check", ann, "--videos", "/nonexistent"])
    assert bad.exit_code == 1 and "are missing or undecodable (exit status 1" in bad.output
    assert runner.invoke(app, ["data", "check", ann, "--videos", "/nonexistent", "--allow-bad"]).exit_code == 0
    assert runner.invoke(app, ["data", "check", str(tmp_path / "none.json")]).exit_code == 2


# ------------------------------------------------------------------ 3. a diverging run


def test_a_diverging_run_is_caught_not_crashed(tmp_path, synthvl, model):
    result = _pretrain(_recipe(tmp_path, synthvl, model, max_steps=8, max_nonfinite=2),
                       "train.lr=1e6", "train.warmup_steps=0", "train.clip_grad_norm=0")
    # either it survives (the guard skipped the bad updates) or it stops with the guard's message
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert "non-finite steps in a row" in _error(result)


def test_hard_negative_sampling_survives_non_finite_similarities():
    """NaN similarities (a diverging run) must not crash torch.multinomial: the step goes on and the
    Trainer's non-finite guard handles the NaN loss."""
    from evl.losses.functional import sample_hard_negatives

    sim = torch.randn(4, 4)
    sim[1, 2] = float("nan")
    sim[2] = float("inf")
    neg = sample_hard_negatives(sim)
    for idx in (neg.text_for_video, neg.video_for_text):
        assert idx.shape == (4,) and ((idx >= 0) & (idx < 4)).all() and (idx != torch.arange(4)).all()


# ------------------------------------------------------------------ 4. errors, not tracebacks


@pytest.mark.parametrize("override,expected", [
    ("train.device=banana", "train.device='banana' is not a device"),
    ("train.device=cuda:99", "train.device='cuda:99'"),
    ("train.batch_size=.inf", "train.batch_size: expected an integer, got inf"),
    ("train.max_steps=.nan", "train.max_steps: expected an integer, got nan"),
    ("train.lr=.nan", "train.lr: expected a number, got NaN"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("data.max_text_len=100000", "data.max_text_len=100000: texts are cut to this many tokens"),
])
def test_bad_settings_are_one_line_errors(tmp_path, synthvl, model, override, expected):
    assert expected in _error(_pretrain(_recipe(tmp_path, synthvl, model), override))
    assert not (tmp_path / "run" / "final").exists()


def test_recipe_base_cycles_are_errors(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "refers back to itself" in _error(_pretrain(tmp_path / "self.yaml"))
    assert "a.yaml -> " in _error(_pretrain(tmp_path / "a.yaml"))


def test_data_check_on_hostile_files(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _error(runner.invoke(app, ["data", "check", str(deep)]))
    huge = tmp_path / "huge.csv"
    huge.write_text("video,question,answer,a0,a1\nv1," + "x" * 200_000 + ",0,yes,no\n")
    assert "line 2: unreadable CSV (field larger than field limit" in _error(
        runner.invoke(app, ["data", "check", str(huge)]))
    huge.write_text("video," + "q" * 200_000 + "\nv1,x\n")
    assert "unreadable CSV" in _error(runner.invoke(app, ["data", "check", str(huge)]))


def _saved_model(tmp_path: Path, model: dict) -> Path:
    from evl.models.model import VideoLanguageModel

    out = tmp_path / "saved"
    VideoLanguageModel.from_config_dict(model).save_pretrained(out)
    return out


def test_absurd_config_json_is_refused_before_allocating(tmp_path, model):
    from evl.errors import CheckpointError
    from evl.models.model import VideoLanguageModel

    saved = _saved_model(tmp_path, model)
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model"]["text"]["vocab_size"] = 10**12
    (saved / "config.json").write_text(json.dumps(cfg))
    # refused by the config's bound (evl.config.MAX_COUNT) before any shape is compared or allocated
    expected = "config.json: text.vocab_size=1000000000000: must be between 1 and 1000000"
    with pytest.raises(CheckpointError, match=expected):
        VideoLanguageModel.from_pretrained(saved)
    data = tmp_path / "r.json"
    data.write_text('[{"video": "a.mp4", "caption": "a red ball"}]')
    result = runner.invoke(app, ["eval", str(saved), "--task", "retrieval", "--data", str(data)])
    assert expected in _error(result)
    cfg["model"]["text"]["vocab_size"] = 1000   # within bounds, but not what the weights hold
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not describe the weights .*vocab|word_embeddings"):
        VideoLanguageModel.from_pretrained(saved)


def test_a_hand_edited_trainer_state_is_named(tmp_path, synthvl, model):
    recipe = _recipe(tmp_path, synthvl, model)
    assert _pretrain(recipe).exit_code == 0
    state = tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json"
    data = json.loads(state.read_text())
    state.write_text(json.dumps({**data, "step": "3"}))
    message = _error(_pretrain(recipe, "train.max_steps=5", "--resume"))
    assert "trainer_state.json: step must be a non-negative integer, got '3'" in message


def test_disk_full_while_saving_is_an_error_and_keeps_the_previous_file(tmp_path, synthvl, model, monkeypatch):
    import evl.checkpoint as ckpt

    real = ckpt.save_file

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt.atomic_write_json(tmp_path / "keep.json", {"a": 1})
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match="no space left on the device while writing"):
        ckpt.atomic_write_safetensors(tmp_path / "keep.json", {"x": torch.zeros(2)})
    assert json.loads((tmp_path / "keep.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]   # no temporary file left behind
    message = _error(_pretrain(_recipe(tmp_path, synthvl, model)))
    assert "no space left on the device" in message and "train.out_dir" in message
    monkeypatch.setattr(ckpt, "save_file", real)


# ------------------------------------------------------------------ 5. an unwritable out_dir


def test_unwritable_out_dir_fails_before_the_first_step(tmp_path, synthvl, model, monkeypatch):
    from evl.train.trainer import Trainer

    def never(*a, **k):
        raise AssertionError("a training step ran although the output folder cannot be written")

    monkeypatch.setattr(Trainer, "_train_step", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = _error(_pretrain(_recipe(tmp_path, synthvl, model), f"train.out_dir={blocker / 'run'}"))
    assert f"train.out_dir={blocker / 'run'} cannot be written" in message and "nothing was trained" in message


# ------------------------------------------------------------------ 6. file modes


def test_checkpoint_files_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files must be readable as any other
    file the user writes, so teammates on shared storage can read final/."""
    from evl.checkpoint import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ 8. smaller ones


def test_eval_rejects_out_of_range_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    data = tmp_path / "a.json"
    data.write_text("[]")
    for args, message in ((["--frames", "0"], "--frames 0: must be a positive"),
                          (["--rerank-k", "-1"], "--rerank-k -1: must be between 0 and 100000")):
        result = runner.invoke(app, ["eval", str(tmp_path), "--task", "retrieval", "--data", str(data), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_png_renamed_mp4_is_not_a_video(tmp_path):
    import av
    import numpy as np

    from evl.data.check import check_annotations

    (tmp_path / "videos").mkdir()
    image = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    with av.open(str(tmp_path / "videos" / "a.mp4"), "w", format="image2pipe") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        for packet in [*stream.encode(image), *stream.encode()]:
            out.mux(packet)
    (tmp_path / "a.json").write_text('[{"video": "a.mp4", "caption": "a red ball"}]')
    s = check_annotations(tmp_path / "a.json", videos_dir=tmp_path / "videos")
    assert s["undecodable"] == 1 and s["undecodable_examples"][0]["reason"] == "a still image (png), not a video"


@pytest.mark.parametrize("row,message", [
    ({"video": "a.mp4", "caption": "   "}, "field 'caption' is '   '; expected a non-blank string"),
    ({"video": "a.mp4", "caption": ["ok", "\t"]}, "field 'caption'"),
    ({"video": "a.mp4", "question": "what?", "answer": "red", "qtype": 5}, "field 'qtype' is 5"),
    ({"video": "a.mp4", "question": "what?", "answer": " "}, "field 'answer'"),
])
def test_blank_texts_and_non_string_types_are_refused(tmp_path, row, message):
    from evl.data.annotations import read_annotations
    from evl.errors import AnnotationError

    (tmp_path / "a.json").write_text(json.dumps([row]))
    with pytest.raises(AnnotationError, match=f"row 1: {message[:30]}"):
        read_annotations(tmp_path / "a.json")


# ------------------------------------------------------------------ what already held, kept


def test_malformed_rows_corrupt_weights_and_pickles_are_errors(tmp_path, model):
    import pickle

    from evl.errors import CheckpointError
    from evl.models.model import VideoLanguageModel

    bad = tmp_path / "bad.json"
    bad.write_text('[{"video": "a.mp4"}, {"caption": "no video"}]')
    assert "row 1" in _error(runner.invoke(app, ["data", "check", str(bad)]))
    saved = _saved_model(tmp_path, model)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        VideoLanguageModel.from_pretrained(saved)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    weights.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        VideoLanguageModel.from_pretrained(saved)
    assert not (tmp_path / "pwned").exists()   # no code ran on load
