"""Soak test of resumability: a short `evl pretrain` killed with SIGKILL at random moments, resumed each time.

Run A trains uninterrupted. Run B is launched with `--resume` again and again; each launch is killed
with SIGKILL after a random delay (seeded), until `--kills` kills have landed or the run finishes;
then it is resumed to the end. Reported: whether B's final weights and every logged loss equal A's
bit for bit, the step each kill landed at and whether it landed during training (the launch had logged
a new step, or was inside a checkpoint write) or during start-up (interpreter, imports, set-up, resume,
or a first step not yet logged), how many kills landed inside a checkpoint write (a `.tmp-*` file or
folder was left behind), and the time lost to the kills.

Usage: python benchmarks/soak_resume.py [--kills 20] [--steps 40] [--seed 0] [--work DIR] [--shards]
Prints a table and writes benchmarks/results/soak_resume.json. `--shards` trains both runs from tar shards of
the same set (`evl shard`, 10 samples per shard) streamed by 2 loader workers, and writes
benchmarks/results/soak_resume_shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOSS_KEYS = ("loss", "vtc", "vtm", "mlm", "lr", "grad_norm")


def _model() -> dict:
    return {"video": {"image_size": 32, "patch_size": 16, "tubelet_size": 2, "num_frames": 4, "hidden_size": 32,
                      "num_layers": 2, "num_heads": 2, "dropout": 0.0},
            "text": {"pretrained": None, "vocab_size": 30522, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 64, "dropout": 0.0,
                     "attention_dropout": 0.0},
            "fusion": {"kind": "encoder", "num_layers": 1, "num_heads": 2}, "embed_dim": 16}


def _recipe(path: Path, data: Path, out: Path, steps: int, shards: Path | None = None) -> Path:
    source = {"train": str(shards), "shuffle_buffer": 16} if shards else \
        {"train": str(data / "annotations" / "pretrain.json"), "videos": str(data / "videos")}
    path.write_text(yaml.safe_dump({
        "task": "pretrain", "model": _model(), "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, "data": source,
        "train": {"max_steps": steps, "batch_size": 8, "log_every": 1, "ckpt_every": 1, "keep_last": 2, "seed": 0,
                  "lr": 1e-3, "precision": "fp32", "num_workers": 2 if shards else 0, "out_dir": str(out)}}))
    return path


def _launch(recipe: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evl.cli", "pretrain", str(recipe), "--no-eval", *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    # its own process group: a kill takes the loader workers with it, as a machine failure would
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _leftovers(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.rglob(".*")) if root.is_dir() else []


def soak(kills: int, steps: int, seed: int, work: Path, use_shards: bool = False) -> dict:
    from safetensors.torch import load_file

    from evl.data.shard_write import write_shards
    from evl.data.synthetic import write_synthvl

    data = work / "synthvl"
    if not (data / "annotations" / "pretrain.json").is_file():
        write_synthvl(data, clips=20, seed=0, frames=8, size=32)
    shards = work / "shards" if use_shards else None
    if shards is not None and not (shards / "index.json").is_file():
        write_shards(data / "annotations" / "pretrain.json", data / "videos", shards, samples_per_shard=10)
    out_a, out_b = work / "a", work / "b"
    t0 = time.perf_counter()
    proc = _launch(_recipe(work / "a.yaml", data, out_a, steps, shards), resume=False)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"run A failed:\n{err[-3000:]}")
    t_a = time.perf_counter() - t0
    recipe_b = _recipe(work / "b.yaml", data, out_b, steps, shards)
    rng = random.Random(seed)
    landed, inside, finished_early, launches = 0, 0, False, 0
    kill_log: list[dict] = []
    t0 = time.perf_counter()
    while landed < kills:
        launches += 1
        before = set(_leftovers(out_b))   # a stale temporary stays until the next checkpoint write clears it
        step_before = max((r["step"] for r in _metrics(out_b)), default=0)
        proc = _launch(recipe_b, resume=True)
        delay = rng.uniform(0.1, 0.45) * t_a   # a launch starts (a few s), then trains
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            landed += 1
            left = sorted(set(_leftovers(out_b)) - before)
            inside += bool(left)
            step = max((r["step"] for r in _metrics(out_b)), default=0)
            # where the kill landed: "training" when this launch logged at least one new step or was
            # inside a checkpoint write; otherwise "start-up" (interpreter, imports, model and data set-up,
            # resume, or the first step of the launch before it was logged: a conservative count)
            phase = "training" if step > step_before or left else "start-up"
            kill_log.append({"kill": landed, "delay_s": round(delay, 2), "step_before_launch": step_before,
                             "step_at_kill": step, "steps_this_launch": step - step_before, "phase": phase,
                             "inside_checkpoint_write": bool(left)})
            print(f"kill {landed:2d} after {delay:5.1f} s: logged up to step {step} ({phase}, "
                  f"{step - step_before} new steps)" + (f", left {left[:3]} behind" if left else ""), flush=True)
            continue
        err = proc.communicate()[1]
        if proc.returncode != 0:
            raise SystemExit(f"a resumed launch of run B failed:\n{err[-3000:]}")
        finished_early = True
        break
    if not finished_early:
        proc = _launch(recipe_b, resume=True)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the final resume of run B failed:\n{err[-3000:]}")
    t_b = time.perf_counter() - t0
    a_log, b_log = _metrics(out_a), _metrics(out_b)
    same_steps = [r["step"] for r in a_log] == [r["step"] for r in b_log] == list(range(1, steps + 1))
    same_losses = same_steps and all({k: ra.get(k) for k in LOSS_KEYS} == {k: rb.get(k) for k in LOSS_KEYS}
                                     for ra, rb in zip(a_log, b_log, strict=True))
    wa, wb = (load_file(o / "final" / "model.safetensors") for o in (out_a, out_b))
    same_weights = wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    return {"steps": steps, "kills": landed, "launches": launches, "kills_inside_checkpoint_write": inside,
            "kills_during_training": sum(k["phase"] == "training" for k in kill_log),
            "kills_during_startup": sum(k["phase"] == "start-up" for k in kill_log),
            "distinct_steps_killed_at": sorted({k["step_at_kill"] for k in kill_log if k["phase"] == "training"}),
            "kill_log": kill_log,
            "finished_before_all_kills": finished_early, "same_logged_steps": same_steps,
            "same_losses": same_losses, "same_final_weights": same_weights,
            "uninterrupted_s": round(t_a, 1), "killed_and_resumed_s": round(t_b, 1),
            "leftover_temporaries_at_end": _leftovers(out_b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--shards", action="store_true", help="train from tar shards streamed by 2 loader workers")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.json = args.json or HERE / "results" / ("soak_resume_shards.json" if args.shards else "soak_resume.json")
    from evl.precision import cpu_info

    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[args.seed], precision="fp32")   # --seed draws the kill delays; training seed 0, fp32
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = soak(args.kills, args.steps, args.seed, args.work, args.shards)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(args.kills, args.steps, args.seed, Path(tmp), args.shards)
    info = cpu_info()
    result["cpu"] = info
    result["meta"] = finish_meta(meta)
    print()
    for key in ("steps", "kills", "launches", "kills_during_training", "kills_during_startup",
                "kills_inside_checkpoint_write", "distinct_steps_killed_at", "same_logged_steps", "same_losses",
                "same_final_weights", "uninterrupted_s", "killed_and_resumed_s"):
        print(f"{key:32s} {result[key]}")
    print(f"CPU: {info['model']} ({info['capability']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if not (result["same_losses"] and result["same_final_weights"]):
        raise SystemExit("the killed-and-resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
