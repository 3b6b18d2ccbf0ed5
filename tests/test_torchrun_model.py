"""`evl pretrain` under torchrun (gloo, CPU) on the real model: 2 ranks == 1 rank, same global batch.

Complements tests/test_torchrun.py (toy model, Trainer API) with the real command, the real
VideoLanguageModel, the SynthVL data pipeline and the cross-rank VTC gather.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _write_recipe(path: Path, synthvl: Path, out_dir: Path, model: dict, objectives: dict | None = None,
                  steps: int = 4) -> Path:
    recipe = {
        "task": "pretrain",
        "model": model,
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        # VTC only: its logits are built on the gathered global batch, so it is the same loss for any
        # number of ranks. VTM mines hard negatives within each rank's micro-batch and MLM masks per
        # micro-batch (seeded by its first sample), so both legitimately differ between world sizes.
        "objectives": objectives or {"vtc": 1.0},
        "train": {"max_steps": steps, "batch_size": 8, "log_every": 1, "ckpt_every": 0, "out_dir": str(out_dir),
                  # no find_unused_parameters: with VTM and MLM off, run_recipe freezes the fusion encoder
                  # and the VTM/MLM heads, which would otherwise stall DDP's gradient reduction
                  "seed": 0, "lr": 1e-3, "precision": "fp32", "num_workers": 0},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _pretrain(recipe: Path, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "evl.cli", "pretrain", str(recipe), "--no-eval"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _records(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in ("step", "loss", "vtc", "lr")} for r in map(json.loads, lines)]


def test_pretrain_two_ranks_match_one_rank(synthvl, tiny_model_dict_factory, tmp_path):
    from safetensors.torch import load_file

    # random-init text tower with the tokenizer's vocabulary; text dropout is 0 in the factory
    model = tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)
    model["embed_dim"] = 32
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        _pretrain(_write_recipe(tmp_path / f"recipe{nproc}.yaml", synthvl, out, model), nproc)
        runs[nproc] = out

    one, two = _records(runs[1]), _records(runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(two, one, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["vtc"] == pytest.approx(b["vtc"], abs=1e-5), (a, b)

    # Adam's first steps move each weight by about ±lr whatever the gradient's size, so an element whose
    # gradient is ~0 can take a different step from float reduction-order noise (measured: one element
    # of 94 tensors off by 1.7e-5). A tenth of one step (lr/10) still catches any real divergence.
    weights = {n: load_file(runs[n] / "final" / "model.safetensors") for n in (1, 2)}
    assert weights[1].keys() == weights[2].keys()
    for k, w in weights[1].items():
        torch.testing.assert_close(weights[2][k], w, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_backbone_fusion_with_vtc_and_mlm_trains_under_ddp(synthvl, tiny_model_dict_factory, tmp_path):
    """Backbone fusion with VTC + MLM and no VTM: the last video block's cross-attention feeds nothing
    MLM reads, so it never gets a gradient and DDP used to stop with an unused-parameter error. The
    probe pass finds and freezes it; a 2-rank run then trains."""
    model = tiny_model_dict_factory("backbone", vocab_size=30522, num_frames=4)
    model["embed_dim"] = 32
    out = tmp_path / "run"
    _pretrain(_write_recipe(tmp_path / "recipe.yaml", synthvl, out, model, {"vtc": 1.0, "mlm": 1.0}, steps=2), 2)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
