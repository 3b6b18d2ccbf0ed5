"""Out-of-range and mixed-up inputs are refused before any work, with one line that names the key or
option, the value and what to do: loss weights, runs that never updated a weight, used out_dirs, the
wrong kind of checkpoint, VLAP / VQ / eval options; video paths outside the videos folder warn."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cli_checks import error_line, invoke
from evl.data import MAX_FRAMES
from evl.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_invoke, _error = invoke, error_line


def _pretrain_recipe(tmp_path: Path, synthvl: Path, model: dict, **train) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "task": "pretrain", "model": model, "objectives": {"vtc": 1.0},
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "log_every": 1, "ckpt_every": 0,
                  "out_dir": str(tmp_path / "run"), **train}}))
    return path


@pytest.fixture
def model(tiny_model_dict_factory):
    return tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)


@pytest.fixture(scope="module")
def base(untrained_checkpoint):
    return untrained_checkpoint


@pytest.fixture(scope="module")
def frame_qa(tmp_path_factory, base):
    """A frame-QA checkpoint (what `evl vlap train` writes), on the towers of `base`."""
    from evl.techniques.vlap.frame_qa import FrameQAConfig, FrameQAModel

    cfg = FrameQAConfig(num_candidates=4, select="all", answerer_layers=1, answerer_heads=2, num_answers=3)
    cfg.qformer.hidden_size, cfg.qformer.num_queries, cfg.qformer.num_heads = 32, 2, 2
    out = tmp_path_factory.mktemp("frame_qa") / "final"
    FrameQAModel.from_backbone(base, cfg).save_pretrained(out)
    return out


# ------------------------------------------------------------------ 9. loss weights, untrained runs


@pytest.mark.parametrize("weight", [".inf", ".nan", "-.inf"])
def test_a_loss_weight_must_be_finite(weight):
    from evl.recipes import load_recipe

    with pytest.raises(ConfigError, match=r"objectives\.vtc: the weight must be a finite number >= 0, got "):
        load_recipe("pretrain-tiny", [f"objectives={{vtc: {weight}}}"])
    with pytest.raises(ConfigError, match=r"objectives\.vtm: the weight must be a finite number"):
        load_recipe("pretrain-tiny", [f"objectives.vtm={weight}"])


def test_a_trainer_run_that_never_updated_the_weights_fails(tmp_path):
    """Every step non-finite but fewer in a row than train.max_nonfinite: before, the run ended as a
    success (and `run_recipe` saved the initial weights as final/)."""
    from evl.train.trainer import NonFiniteLossError, TrainConfig, Trainer

    data = [{"x": torch.randn(3)} for _ in range(8)]

    def loss_fn(module, batch):
        return {"loss": module(batch["x"]).sum() * math.inf}

    cfg = TrainConfig(max_steps=4, batch_size=2, max_nonfinite=5, ckpt_every=0, precision="fp32",
                      out_dir=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match="none of the 4 steps updated the weights"):
        Trainer(torch.nn.Linear(3, 1), loss_fn, data, cfg).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pretrain_whose_every_step_was_skipped_exits_with_an_error_and_no_final(tmp_path, synthvl, model,
                                                                               monkeypatch):
    from evl.train.objective import TrainObjective

    forward = TrainObjective.forward

    def nonfinite(self, batch):
        out = forward(self, batch)
        return {**out, "loss": out["loss"] * math.inf}

    monkeypatch.setattr(TrainObjective, "forward", nonfinite)
    recipe = _pretrain_recipe(tmp_path, synthvl, model)
    message = _error(_invoke(["pretrain", recipe, "--no-eval"]))
    assert "none of the 2 steps updated the weights" in message
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "summary.json").exists()


# ------------------------------------------------------------------ 10. out_dir with an earlier run's output


@pytest.mark.parametrize("earlier", ["final", "summary.json"])
def test_check_out_dir_counts_any_earlier_output(tmp_path, earlier):
    from evl.train.state import check_out_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")   # a crashed run's log, or a feature cache, is not a result
    (out / "features").mkdir()
    check_out_dir(out, resume=False, overwrite=False)
    (out / earlier).mkdir() if earlier == "final" else (out / earlier).write_text("{}")
    for resume in (False, True):   # --resume with no checkpoint would train from step 0 over it
        with pytest.raises(ConfigError, match=rf"train\.out_dir={out} holds an earlier run's output \({earlier}\)"):
            check_out_dir(out, resume=resume, overwrite=False)
    check_out_dir(out, resume=False, overwrite=True)


def test_pretrain_refuses_to_replace_a_final_whose_checkpoints_were_deleted(tmp_path, synthvl, model):
    recipe = _pretrain_recipe(tmp_path, synthvl, model)
    assert _invoke(["pretrain", recipe, "--no-eval"]).exit_code == 0
    run = tmp_path / "run"
    weights = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints")
    message = _error(_invoke(["pretrain", recipe, "--no-eval", "train.max_steps=1"]))
    assert f"train.out_dir={run} holds an earlier run's output (final, summary.json)" in message
    assert "train.overwrite=true" in message
    assert (run / "final" / "model.safetensors").read_bytes() == weights
    assert _invoke(["pretrain", recipe, "--no-eval", "train.max_steps=1", "train.overwrite=true"]).exit_code == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_vq_train_refuses_an_out_dir_with_an_earlier_final(tmp_path, synthvl, model):
    out = tmp_path / "vq"
    (out / "final").mkdir(parents=True)
    recipe = tmp_path / "vq.yaml"
    recipe.write_text(yaml.safe_dump({
        "tokenizer": {"video": model["video"], "num_codes": 8, "code_dim": 8, "decoder_layers": 1,
                      "target": "pixel"},
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        "usage_clips": 4, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "out_dir": str(out)}}))
    assert "holds an earlier run's output (final)" in _error(_invoke(["vq", "train", recipe]))


# ------------------------------------------------------------------ 11. a frame-QA checkpoint where a model is expected


def test_a_frame_qa_checkpoint_where_a_video_language_model_is_expected_says_what_it_is(tmp_path, synthvl,
                                                                                       frame_qa, model):
    from evl.models.model import VideoLanguageModel

    with pytest.raises(CheckpointError, match=r"holds a frame-QA model \(kind 'frame_qa', from `evl vlap train`"):
        VideoLanguageModel.from_pretrained(frame_qa)
    message = _error(_invoke(["eval", frame_qa, "--task", "retrieval", "--data",
                              synthvl / "annotations" / "retrieval_test.json"]))
    assert "holds a frame-QA model" in message and "not a video-language model" in message
    assert "unknown key" not in message
    recipe = tmp_path / "vq.yaml"
    recipe.write_text(yaml.safe_dump({
        "tokenizer": {"video": model["video"], "num_codes": 8, "code_dim": 8, "decoder_layers": 1},
        "teacher": str(frame_qa),
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        "train": {"max_steps": 1, "batch_size": 4, "out_dir": str(tmp_path / "vq")}}))
    assert "holds a frame-QA model" in _error(_invoke(["vq", "train", recipe]))


# ------------------------------------------------------------------ 12. VLAP, VQ and eval options


def test_vlap_recipe_values_are_checked_when_loaded():
    from evl.techniques.vlap.train import load_vlap_recipe

    with pytest.raises(ConfigError, match=r"tau_start=inf"):
        load_vlap_recipe("vlap-teacher-tiny", ["model.tau_start=.inf"])
    with pytest.raises(ConfigError, match=r"batch_size_eval=0: must be >= 1"):
        load_vlap_recipe("vlap-teacher-tiny", ["batch_size_eval=0"])
    with pytest.raises(ConfigError, match=rf"num_candidates=100000: at most {MAX_FRAMES} candidate frames"):
        load_vlap_recipe("vlap-teacher-tiny", ["model.num_candidates=100000"])
    assert load_vlap_recipe("vlap-teacher-tiny", [f"model.num_candidates={MAX_FRAMES}"]).model.num_candidates == MAX_FRAMES
    assert f"at most {MAX_FRAMES}" in _error(_invoke(["vlap", "train", "vlap-teacher-tiny",
                                                      "model.num_candidates=100000"]))


def test_vlap_train_into_an_unwritable_out_dir_fails_before_extracting_features(tmp_path, synthvl, base):
    from evl.techniques.vlap.train import load_vlap_recipe, train_vlap

    blocker = tmp_path / "a_file"
    blocker.write_text("")   # a folder below a file cannot be created, whoever runs the test (root too)
    ann = synthvl / "annotations"
    recipe = load_vlap_recipe(None, [f"backbone={base}", f"data.train={ann / 'qa_train.json'}",
                                     f"data.videos={synthvl / 'videos'}", f"train.out_dir={blocker / 'run'}",
                                     "model.num_candidates=4", "train.max_steps=1", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"train\.out_dir=.*cannot be written"):
        train_vlap(recipe)


def test_vq_usage_clips_must_not_be_negative():
    from evl.techniques.evilm.vq_train import load_vq_recipe

    with pytest.raises(ConfigError, match=r"usage_clips=-1: must be >= 0"):
        load_vq_recipe("vq-tiny", ["usage_clips=-1"])
    assert load_vq_recipe("vq-tiny", ["usage_clips=0"]).usage_clips == 0


def test_eval_frames_has_an_upper_bound_stated_in_help_and_error(tmp_path):
    result = _invoke(["eval", "--help"])
    assert result.exit_code == 0 and f"1 to {MAX_FRAMES}" in result.output
    message = _error(_invoke(["eval", tmp_path, "--task", "retrieval", "--data", tmp_path / "x.json",
                              "--frames", "1000000"]))
    assert f"--frames 1000000: must be a positive number of frames, at most {MAX_FRAMES} per clip" in message


def test_eval_names_the_valid_devices(tmp_path, base):
    data = tmp_path / "test.json"
    data.write_text("[]")
    message = _error(_invoke(["eval", base, "--task", "retrieval", "--data", data, "--device", "banana"]))
    assert "'banana' is not a device; use auto, cpu, cuda or cuda:N" in message


# ------------------------------------------------------------------ 13. video paths outside the videos folder


def test_video_paths_outside_the_videos_folder_warn_once_per_dataset(tmp_path, synthvl, caplog):
    from evl.data.datasets import ClipSettings, VideoTextDataset

    rows = json.loads((synthvl / "annotations" / "pretrain.json").read_text())
    clip = ClipSettings(num_frames=4, size=32)
    with caplog.at_level(logging.WARNING, logger="evl.data.datasets"):
        VideoTextDataset.from_file(synthvl / "annotations" / "pretrain.json", synthvl / "videos", clip)
    assert not caplog.records
    rows[2]["video"] = "../../elsewhere/secret.mp4"
    rows[5]["video"] = "/etc/passwd"
    rows[6]["video"] = str(synthvl / "videos" / rows[6]["video"])   # absolute, but inside: fine
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="evl.data.datasets"):
        VideoTextDataset.from_file(ann, synthvl / "videos", clip)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(f"2 of {len(rows)} records name a video outside the videos folder")
    assert f"{ann}:3" in message and "../../elsewhere/secret.mp4" in message
