"""Multi-process training under torchrun (gloo, CPU): same global batches and losses as one process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evl.checkpoint import load_model_state
from evl.train.trainer import Trainer

WORKER = Path(__file__).with_name("torchrun_worker.py")
ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("torchrun_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in ("step", "loss", "mae", "lr")} for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """Reference: one process, global batch 8, no accumulation."""
    out = tmp_path_factory.mktemp("single")
    Trainer(worker.make_model(), worker.toy_loss, worker.ToyData(), worker.toy_config(str(out))).fit()
    return out


def _assert_same(run: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in run] == [r["step"] for r in ref] == list(range(1, 9))
    for a, b in zip(run, ref, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["mae"] == pytest.approx(b["mae"], abs=1e-5), (a, b)


def test_ddp_two_ranks_match_one_process(single_process, tmp_path):
    _torchrun(str(tmp_path), "ddp", "1")
    _assert_same(_losses(tmp_path), _losses(single_process))
    # rank 0 wrote the checkpoint without DDP's "module." prefix: it loads into the bare model
    assert load_model_state(worker.ToyModel(), tmp_path / "checkpoints" / "step_00000008").ok


def test_fsdp2_with_accumulation_killed_and_resumed_matches_one_process(single_process, tmp_path):
    """FSDP2 on gloo, 2 ranks x micro-batch 2 x grad_accum 2; killed after the step-4 checkpoint."""
    _torchrun(str(tmp_path), "fsdp", "2", "4")
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 4
    _torchrun(str(tmp_path), "fsdp", "2", "0", "resume")
    _assert_same(_losses(tmp_path), _losses(single_process))
    assert load_model_state(worker.ToyModel(), tmp_path / "checkpoints" / "step_00000008").ok
