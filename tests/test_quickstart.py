"""`evl quickstart`: the pre-training recipe it runs is named, checked before anything is written, and
reported."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evl.cli import app
from evl.quickstart import DEFAULT_CLIPS, PRETRAIN_RECIPE, format_table, quickstart_splits, run_quickstart


@pytest.mark.parametrize("name, msg", [("pretrain-tiny-nope", "pretrain-tiny-nope"), ("qa-tiny", "task is 'qa'")])
def test_a_bad_pretrain_recipe_is_refused_before_anything_is_written(tmp_path, name, msg):
    res = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), "--pretrain-recipe", name])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output
    assert not (tmp_path / "qs").exists()


def test_the_default_is_a_packaged_pretraining_recipe():
    from evl.quickstart import pretrain_recipe_checked

    assert pretrain_recipe_checked(PRETRAIN_RECIPE).task == "pretrain"


@pytest.mark.parametrize("clips, splits", [(60, (42, 6, 12)), (65, (46, 6, 13)), (500, (350, 50, 100)),
                                           (501, (351, 50, 100)), (1550, (1400, 50, 100))])
def test_splits_keep_the_test_split_at_100_clips_beyond_500(clips, splits):
    """70/10/20% up to 500 clips (the earlier quickstart's splits, clip for clip), every further clip trains."""
    assert quickstart_splits(clips) == splits and sum(splits) == clips
    assert quickstart_splits(DEFAULT_CLIPS) == (1400, 50, 100)


@pytest.mark.slow
def test_quickstart_runs_the_named_recipe_and_reports_it(tmp_path):
    report = run_quickstart(tmp_path / "qs", clips=60, seed=0, pretrain_steps=2, retrieval_steps=1, qa_steps=1,
                            pretrain_recipe="pretrain-tiny-lit")
    assert report["pretrain_recipe"] == "pretrain-tiny-lit"
    assert report["train"]["objectives"]["pretrain"] == {"vtc": 1.0}
    assert report["train"]["steps"] == {"pretrain": 2, "retrieval": 1, "qa": 1}
    assert report["data"]["splits"] == {"train": 42, "val": 6, "test": 12}
    assert report["model"]["text"]["locked_layers"] == 1     # the lock travels with the checkpoint
    assert report["model"]["video"]["conv_stem"] == 32        # and so does the video stem
    assert report["model"]["fusion"]["dual_residual"] is True  # and the fusion's dual residual
    assert json.loads((tmp_path / "qs" / "report.json").read_text())["pretrain_recipe"] == "pretrain-tiny-lit"
    assert "pre-training recipe      pretrain-tiny-lit (vtc, 2 steps)" in format_table(report)
    assert (tmp_path / "qs" / "training_curves.png").is_file()
