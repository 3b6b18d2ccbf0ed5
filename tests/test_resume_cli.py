"""`evl pretrain` killed with SIGKILL and resumed logs the same losses as an uninterrupted run.

Complements tests/test_train.py (a toy model, an exception raised inside `fit`) with the real command,
the real VideoLanguageModel with VTC + VTM (hard-negative sampling) + MLM (random masking), the
SynthVL data pipeline (random frame sampling and captions) and a real SIGKILL of the process.

Where the kill lands is made deterministic: for the first launch of run B only, a `sitecustomize`
module (put on PYTHONPATH; the command line is unchanged) makes `evl.train.state.commit_dir` block
when it is about to commit the checkpoint of step 6. At that instant step 4's checkpoint is committed,
metrics.jsonl already holds steps 5 and 6, and `.tmp-step_00000006` is fully written but not yet
renamed — the worst moment for a kill. Polling for a step with a live, fast process instead would
make the test racy (the whole run takes a few seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
BATCH = 8
LOSS_KEYS = ("loss", "vtc", "vtm", "mlm", "lr")

BLOCKER = '''\
"""Test hook (tests/test_resume_cli.py): block before committing one checkpoint, until killed."""
import os
import time
from pathlib import Path

import evl.train.state as _ts

_real_commit_dir = _ts.commit_dir


def _blocking_commit_dir(tmp_dir, final_dir):
    if Path(final_dir).name == os.environ["EVL_TEST_BLOCK_AT"]:
        Path(os.environ["EVL_TEST_MARKER"]).write_text(str(os.getpid()))
        while True:
            time.sleep(1)
    return _real_commit_dir(tmp_dir, final_dir)


_ts.commit_dir = _blocking_commit_dir
'''


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", **extra}


def _cmd(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "evl.cli", "pretrain", str(recipe), "--no-eval", *args]


def _run(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(recipe, *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _write_recipe(path: Path, synthvl: Path, out_dir: Path, model: dict, **train) -> Path:
    recipe = {
        "task": "pretrain",
        "model": model,
        "data": {"train": str(synthvl / "annotations" / "pretrain.json"), "videos": str(synthvl / "videos")},
        # all three objectives: VTM's hard negatives (torch.multinomial on the global RNG) and MLM's masking
        # (seeded per batch in the collate) must both replay exactly after a resume
        "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
        # the 45 pretraining captions / batch 8 = 5 steps per epoch: the resumed steps 5-8 cross into epoch 1.
        # keep_last 0 keeps every checkpoint so run B's can be compared with run A's step by step.
        "train": {"max_steps": STEPS, "batch_size": BATCH, "log_every": 1, "ckpt_every": 2, "keep_last": 0,
                  "seed": 0, "lr": 1e-3, "precision": "fp32", "num_workers": 0, "out_dir": str(out_dir), **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _model(tiny_model_dict_factory) -> dict:
    # random-init text tower with the tokenizer's vocabulary; text dropout is 0 in the factory
    model = tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)
    model["video"]["dropout"] = 0.0
    return model


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _check_loadable(ckpt: Path) -> dict:
    """Every file of a committed training checkpoint reads back (raises CheckpointError otherwise)."""
    from evl.checkpoint import load_tensor_tree, load_tensors, read_json

    weights = load_tensors(ckpt / "model.safetensors")
    assert weights, ckpt
    assert load_tensor_tree(ckpt, "optimizer")["state"], ckpt
    load_tensors(ckpt / "rng_rank0.safetensors")
    read_json(ckpt / "rng_rank0.json")
    read_json(ckpt / "config.json")
    state = read_json(ckpt / "trainer_state.json")
    assert state["step"] == int(ckpt.name.removeprefix("step_")), (ckpt, state)
    return weights


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run B exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def test_sigkilled_and_resumed_pretrain_logs_the_same_losses(synthvl, tiny_model_dict_factory, tmp_path):
    from safetensors.torch import load_file

    from evl.train.state import latest_checkpoint

    model = _model(tiny_model_dict_factory)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    recipe_a = _write_recipe(tmp_path / "a.yaml", synthvl, out_a, model)
    recipe_b = _write_recipe(tmp_path / "b.yaml", synthvl, out_b, model)

    # --- run A: uninterrupted
    proc = _run(recipe_a)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a_log = _metrics(out_a)
    assert [r["step"] for r in a_log] == list(range(1, STEPS + 1))

    # --- run B, first launch: blocked inside the commit of step 6's checkpoint, then SIGKILLed
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCKER)
    marker = tmp_path / "blocked"
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = _env(PYTHONPATH=pythonpath, EVL_TEST_BLOCK_AT="step_00000006", EVL_TEST_MARKER=str(marker))
    root = out_b / "checkpoints"
    child = subprocess.Popen(_cmd(recipe_b), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for(lambda: (root / "step_00000004" / "trainer_state.json").is_file(), child, 240,
                  "the checkpoint of step 4")
        _wait_for(marker.is_file, child, 60, "the commit of step 6's checkpoint")
        assert child.poll() is None
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    # the kill landed mid-checkpoint: step 6 is written but not committed, latest still names step 4
    assert [r["step"] for r in _metrics(out_b)] == list(range(1, 7))
    assert (root / ".tmp-step_00000006" / "model.safetensors").is_file()
    assert not (root / "step_00000006").exists()
    assert json.loads((root / "latest.json").read_text()) == {"step": 4, "dir": "step_00000004"}
    assert latest_checkpoint(out_b) == root / "step_00000004"
    listed = sorted(p for p in root.glob("step_*"))
    assert [p.name for p in listed] == ["step_00000002", "step_00000004"]
    for ckpt in listed:  # what the killed run left behind is complete, and is what run A wrote
        weights = _check_loadable(ckpt)
        ref = load_file(out_a / "checkpoints" / ckpt.name / "model.safetensors")
        assert weights.keys() == ref.keys()
        assert all(weights[k].equal(ref[k]) for k in ref), ckpt.name

    # --- run B, second launch: --resume to the end (no hook)
    proc = _run(recipe_b, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {root / 'step_00000004'} at step 4" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["steps"] == STEPS

    # every step's losses and lr are exactly run A's: steps 1-4 from the first launch, 5-8 replayed
    # (the lines of steps 5-6 logged before the kill were dropped, not duplicated)
    b_log = _metrics(out_b)
    assert [r["step"] for r in b_log] == list(range(1, STEPS + 1))
    for ra, rb in zip(a_log, b_log, strict=True):
        assert {k: rb[k] for k in LOSS_KEYS} == {k: ra[k] for k in LOSS_KEYS}, (ra, rb)
        assert rb["grad_norm"] == ra["grad_norm"], (ra, rb)
    # guard against a vacuous comparison: the losses do move from step to step
    assert len({r["loss"] for r in a_log}) == STEPS

    # the final weights, and the last training checkpoint (weights + optimizer), are bit-identical
    final_a, final_b = load_file(out_a / "final" / "model.safetensors"), load_file(out_b / "final" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    assert [k for k in final_a if not final_a[k].equal(final_b[k])] == []
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = (load_file(o / "checkpoints" / "step_00000008" / name) for o in (out_a, out_b))
        assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta), name
    state_a, state_b = (json.loads((o / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
                        for o in (out_a, out_b))
    per_epoch = len(json.loads((synthvl / "annotations" / "pretrain.json").read_text())) // BATCH
    assert 4 < per_epoch < STEPS  # the replayed steps 5-8 cross an epoch boundary
    assert {k: state_b[k] for k in ("step", "epoch", "samples_in_epoch")} == {
        k: state_a[k] for k in ("step", "epoch", "samples_in_epoch")} == {
        "step": STEPS, "epoch": STEPS // per_epoch, "samples_in_epoch": (STEPS % per_epoch) * BATCH}
    # every checkpoint listed after the resume is complete; the stale temporary directory is gone
    assert [p.name for p in sorted(root.glob("step_*"))] == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    for ckpt in sorted(root.glob("step_*")):
        _check_loadable(ckpt)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_resume_without_checkpoint_starts_fresh_and_other_batch_size_is_refused(synthvl, tiny_model_dict_factory,
                                                                                 tmp_path):
    out = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "r.yaml", synthvl, out, _model(tiny_model_dict_factory), max_steps=2)

    # --resume on an out_dir without a checkpoint (here: no out_dir at all) trains from step 0, saying so
    proc = _run(recipe, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resume: no checkpoint in {out}; starting from step 0" in proc.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2

    # --resume with another batch size: a one-line error naming both values, exit code 2, no traceback
    proc = _run(recipe, "--resume", "train.batch_size=4")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot resume from"), proc.stderr
    assert "train.batch_size=8" in proc.stderr and "train.batch_size=4" in proc.stderr, proc.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # the refused run touched nothing
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
