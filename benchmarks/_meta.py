"""What every benchmark JSON records beside its figures (see ../shared/MEASURING.md, "Where figures live"):
the command line, the git commit (and whether the tracked sources differ from it), the CPU kind
(`evl.precision.cpu_info()`: model, torch's SIMD capability, bf16 flags, cores, torch version), the
precision, the seeds, the date, and the load average before and after the run.

    from _meta import run_meta, finish_meta
    meta = run_meta(seeds=[0], precision="fp32")      # at the start of main()
    ...
    json.dump({"meta": finish_meta(meta), ...})       # when writing the JSON

Benchmarks are run as `python benchmarks/NAME.py`, so this folder is on sys.path.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def training_precision() -> str:
    """What `train.precision: auto` resolves to on this CPU ("fp32" or "bf16")."""
    from evl.precision import resolve_precision

    return resolve_precision("auto", "cpu").name


def run_meta(seeds: list[int] | None = None, precision: str | None = None, **extra) -> dict:
    """The metadata dict, started now; `precision` defaults to what `auto` resolves to on this CPU."""
    from evl.precision import cpu_info

    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": dirty.splitlines() if dirty else [],
        "cpu": cpu_info(),
        "threads": _threads(),
        "precision": precision or training_precision(),
        "seeds": seeds,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "_t0": time.perf_counter(),
        **extra,
    }


def _threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:   # pragma: no cover
        return None


def finish_meta(meta: dict) -> dict:
    """A copy of `meta` with the load average after the run, the end date and the wall time."""
    out = {k: v for k, v in meta.items() if k != "_t0"}
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["date_end"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if "_t0" in meta:
        out["wall_s"] = round(time.perf_counter() - meta["_t0"], 1)
    return out


def machine_line(meta: dict) -> str:
    cpu = meta["cpu"]
    return (f"{cpu['model']} ({cpu['capability']}, bf16 flags {cpu['flags_bf16'] or 'none'}, {cpu['cores']} cores), "
            f"torch {cpu['torch']}, precision {meta['precision']}, commit {str(meta['git_commit'])[:10]}"
            + (" (+ uncommitted changes)" if meta["git_dirty_files"] else ""))
