"""The `evl` command through typer's CliRunner: help, `bench model`, and its errors."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from evl.cli import app
from evl.config import packaged_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture
def model_yaml(tmp_path, tiny_model_dict_factory):
    path = tmp_path / "tiny-test.yaml"
    # vocab 2000: `bench` feeds token ids 1000..1999 (see test_model.test_gflops_work_for_a_small_vocabulary)
    path.write_text(yaml.safe_dump(tiny_model_dict_factory("backbone", vocab_size=2000)))
    return path


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("synth", "data", "bench", "quickstart"):
        assert cmd in result.output
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "model" in result.output
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0 and "check" in result.output and "formats" in result.output


def test_bench_model_json(model_yaml):
    result = runner.invoke(app, ["bench", "model", str(model_yaml), "--json", "--repeats", "1", "--batch-sizes", "1,2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"params", "gflops_dual", "gflops_fusion", "latency_ms", "throughput"} <= set(report)
    assert report["config"] == str(model_yaml) and report["frames"] == 4 and report["device"] == "cpu"
    p = report["params"]
    assert p["total"] == p["video"] + p["text"] + p["fusion"] + p["heads"] and p["fusion"] > 0
    assert report["gflops_fusion"] > report["gflops_dual"] > 0
    assert set(report["latency_ms"]) == set(report["throughput"]) == {"1", "2"}
    for b in ("1", "2"):   # throughput is batch / median latency
        assert report["throughput"][b] == pytest.approx(int(b) / (report["latency_ms"][b] / 1e3), rel=1e-9)


def test_bench_model_table_and_frames(model_yaml):
    result = runner.invoke(app, ["bench", "model", str(model_yaml), "--repeats", "1", "--batch-sizes", "1",
                                 "--frames", "8"])
    assert result.exit_code == 0, result.output
    assert "(8 frames, cpu)" in result.output and "GFLOPs/clip dual" in result.output
    assert "batch    1  latency" in result.output


@pytest.mark.parametrize("sizes", ["0", "1,-2", ","])
def test_bench_model_bad_batch_sizes(model_yaml, sizes):
    result = runner.invoke(app, ["bench", "model", str(model_yaml), "--batch-sizes", sizes])
    assert result.exit_code == 2
    assert f"--batch-sizes must list integers from 1 to 256, separated by commas (e.g. 1,4), got {sizes!r}" in result.output


def test_bench_model_bad_precision(model_yaml):
    result = runner.invoke(app, ["bench", "model", str(model_yaml), "--precision", "fp8"])
    assert result.exit_code == 2 and "--precision must be fp32 or bf16, got 'fp8'" in result.output


def test_bench_model_unknown_config_lists_packaged():
    result = runner.invoke(app, ["bench", "model", "no-such-model"])
    assert result.exit_code == 2
    assert "error: model config 'no-such-model' is neither a file nor a packaged model config" in result.output
    packaged = packaged_configs("models")   # the core folder and the techniques' configs
    assert {"tiny", "small", "base", "tiny-backbone"} <= set(packaged)
    assert f"packaged: {', '.join(packaged)}" in result.output


def test_bench_model_bad_model_key(tmp_path, tiny_model_dict_factory):
    d = tiny_model_dict_factory("encoder", vocab_size=2000)
    d["video"]["num_layer"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    result = runner.invoke(app, ["bench", "model", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'num_layer'; did you mean 'num_layers'?" in result.output


def test_synth_and_data_check(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "s"), "--clips", "6", "--frames", "4", "--size", "32"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["clips"] == 6 and summary["frames"] == 4 and summary["size"] == 32
    result = runner.invoke(app, ["data", "check", str(tmp_path / "s" / "annotations" / "retrieval_train.json"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)
    assert (check["records"], check["videos"], check["ok"], check["missing"], check["undecodable"]) == (4, 4, 4, 0, 0)
    result = runner.invoke(app, ["synth", str(tmp_path / "t"), "--clips", "0"])
    assert result.exit_code == 2 and "error: clips must be an integer between 1 and 100000, got 0" in result.output


# ------------------------------------------------------------------ pretrain / finetune / eval


def _summary(output: str) -> dict:
    """The JSON summary printed last (training prints plain progress lines before it)."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.fixture(scope="module")
def cli_run(one_torch_thread, synthvl, tmp_path_factory, tiny_model_dict_factory):
    """`evl pretrain` (2 steps) on an inline tiny recipe, then `evl finetune` QA (1 step) from it."""
    tmp = tmp_path_factory.mktemp("cli")
    ann = synthvl / "annotations"
    recipe = {"task": "pretrain", "model": tiny_model_dict_factory("encoder", vocab_size=30522),
              "data": {"train": str(ann / "pretrain.json"), "test": str(ann / "retrieval_test.json")},
              "train": {"max_steps": 5, "batch_size": 4, "ckpt_every": 0, "log_every": 1,
                        "out_dir": str(tmp / "pre")},
              "eval": {"batch_size": 4, "rerank_k": 2}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        pre = runner.invoke(app, ["pretrain", str(path), "train.max_steps=2"])
        assert pre.exit_code == 0, pre.output
        ft = runner.invoke(app, ["finetune", "qa-tiny", "--init", str(tmp / "pre" / "final"),
                                 f"data.train={ann / 'qa_train.json'}", f"data.test={ann / 'qa_test.json'}",
                                 "train.max_steps=1", "train.batch_size=4", f"train.out_dir={tmp / 'qa'}",
                                 "eval.batch_size=4"])
        assert ft.exit_code == 0, ft.output
    return tmp, pre, ft


def test_cli_pretrain_and_finetune(cli_run):
    tmp, pre, ft = cli_run
    summary = _summary(pre.stdout)
    assert summary["task"] == "pretrain" and summary["steps"] == 2   # the override beat the recipe's 5
    assert summary["checkpoint"] == str(tmp / "pre" / "final") and "t2v_r1" in summary["test"]
    summary = _summary(ft.stdout)
    assert summary["task"] == "qa" and summary["steps"] == 1 and 0.0 <= summary["test"]["accuracy"] <= 100.0
    assert (tmp / "qa" / "final" / "answers.json").is_file()


def test_cli_eval_json(cli_run, synthvl):
    tmp, _, _ = cli_run
    ann = synthvl / "annotations"
    result = runner.invoke(app, ["eval", str(tmp / "pre" / "final"), "--task", "retrieval",
                                 "--data", str(ann / "retrieval_test.json"), "--batch-size", "4", "--rerank-k", "2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "t2v_medr", "rerank_t2v_r1", "num_videos", "chance_r1"} <= set(metrics)
    assert metrics["num_videos"] == 2 and metrics["undecodable"] == 0
    # the same evaluation as the one run right after training
    assert metrics == _summary(cli_run[1].stdout)["test"]

    result = runner.invoke(app, ["eval", str(tmp / "qa" / "final"), "--task", "qa",
                                 "--data", str(ann / "qa_test.json"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["count"] == 12 and 0.0 <= metrics["accuracy"] <= 100.0 and "per_type" in metrics

    result = runner.invoke(app, ["eval", str(tmp / "pre" / "final"), "--task", "mc",
                                 "--data", str(ann / "mc_test.json")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("accuracy ") and "chance                   20.00" in result.stdout


def test_cli_eval_and_finetune_errors(cli_run, synthvl, tmp_path):
    tmp, _, _ = cli_run
    ann = synthvl / "annotations"
    data = ["--data", str(ann / "retrieval_test.json")]
    result = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--task", "retrieval", *data])
    assert result.exit_code == 2 and f"{tmp_path / 'nope'}: not an evl checkpoint folder (no config.json)" in result.output
    result = runner.invoke(app, ["eval", str(tmp / "pre" / "final"), "--task", "caption", *data])
    assert result.exit_code == 2 and "unknown task 'caption'; tasks: pretrain, retrieval, qa, mc" in result.output
    result = runner.invoke(app, ["eval", str(tmp / "pre" / "final"), "--task", "retrieval",
                                 "--data", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "no such annotation file" in result.output
    result = runner.invoke(app, ["eval", str(tmp / "pre" / "final"), "--task", "qa", "--data", str(ann / "qa_test.json")])
    assert result.exit_code == 2 and "has no answers.json" in result.output
    result = runner.invoke(app, ["finetune", "qa-tiny", "--init", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not an evl checkpoint folder (no config.json)" in result.output
    result = runner.invoke(app, ["pretrain", "pretrain-tiny", "train.max_step=3"])
    assert result.exit_code == 2 and "did you mean 'max_steps'?" in result.output
