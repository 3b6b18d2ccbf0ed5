"""`evl bench model` for every packaged model config, in one run, into one JSON.

Runs `evl bench model CONFIG --json` for each config (its own process, one after the other) and keeps
each JSON object as it came, beside the run's metadata (command, commit, CPU kind, precision, date,
load). These are the figures of README "Model sizes and efficiency".

Usage: python benchmarks/bench_model.py [--configs tiny tiny-backbone small base] [--repeats 5]
Prints a table and writes benchmarks/results/bench_model.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_model.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "tiny-backbone", "small", "base"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, machine_line, run_meta

    meta = run_meta(seeds=None, precision="fp32")   # evl bench model times fp32 by default
    rows = {}
    for config in args.configs:
        cmd = [sys.executable, "-m", "evl.cli", "bench", "model", config, "--json", "--repeats", str(args.repeats),
               "--batch-sizes", args.batch_sizes]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[config] = json.loads(out.stdout[out.stdout.index("{"):])
        rows[config]["command"] = " ".join(["evl", *cmd[3:]])
        print(json.dumps(rows[config])[:400], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "configs": rows}, indent=2))
    print(machine_line(meta))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
