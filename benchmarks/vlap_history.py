"""VLAP's latency passes and the SeViLA-style rows before/after their re-run, from the committed history
of benchmarks/results/vlap_frames.json.

`vlap_frames.py` wrote one latency pass per run and the file was overwritten, so two passes over the
same VLAP checkpoints exist only as two commits of the JSON (72da5bd: the first pass; ad9050c: the
pass repeated on a quiet machine, together with SeViLA-style rows re-trained after a review fix).
This script reads every committed version of the file, and writes:

* every latency pass with its source commit, each row's speed-up over all frames per pass, and the
  median over the passes with the range (MEASURING.md: the median of all passes, never the better one);
  the SeViLA-style rows' latencies differ between the passes by their checkpoints too (re-trained);
* the SeViLA-style rows (accuracy, temporal, action, per seed and k) in the first and the latest
  version, and their differences.

Usage: python benchmarks/vlap_history.py
Prints a table and writes benchmarks/results/vlap_history.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = "benchmarks/results/vlap_frames.json"
RESULTS = HERE / "results" / "vlap_history.json"


def versions() -> list[tuple[str, dict]]:
    """(commit, JSON) of every committed version of SOURCE, oldest first."""
    log = subprocess.run(["git", "log", "--reverse", "--format=%H", "--", SOURCE], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    out = []
    for c in log:
        text = subprocess.run(["git", "show", f"{c}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True)
        if text.returncode == 0:
            out.append((c, json.loads(text.stdout)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=None, precision="n/a (reads committed results)")
    vs = versions()
    passes = []
    for commit, d in vs:
        for p in d.get("latency_passes") or ([{"latency": d["latency"]}] if d.get("latency") else []):
            lat = p["latency"]
            if any(q["latency"] == lat for q in passes):
                continue   # the same pass carried into a later version
            base = lat["all frames|16"]
            speedup = {key: {"b1": round(base["ms_per_question_b1"] / v["ms_per_question_b1"], 3),
                             "b32": round(base["ms_per_question_b32"] / v["ms_per_question_b32"], 3)}
                       for key, v in lat.items()}
            passes.append({"commit": commit, "latency": lat, "speedup": speedup})
    summary = {}
    for key in passes[-1]["speedup"]:
        vals = {b: [p["speedup"][key][b] for p in passes if key in p["speedup"]] for b in ("b1", "b32")}
        summary[key] = {f"speedup_{b}_median": round(statistics.median(v), 2) for b, v in vals.items()}
        summary[key].update({f"speedup_{b}_range": [round(min(v), 2), round(max(v), 2)] for b, v in vals.items()})
        summary[key]["passes"] = len(vals["b1"])
        for m in ("ms_per_question_b1", "ms_per_question_b32"):
            ms = [p["latency"][key][m] for p in passes if key in p["latency"]]
            summary[key][f"{m}_median"] = round(statistics.median(ms), 2)
            summary[key][f"{m}_range"] = [round(min(ms), 2), round(max(ms), 2)]
    first, last = vs[0], vs[-1]

    def sevila(d: dict) -> dict:
        return {f"k{r['k']} seed{r['seed']}": {m: r[m] for m in ("accuracy", "temporal", "action")}
                for r in d["rows"] if r["method"].startswith("sevila") or "localizer" in r["method"]}

    before, after = sevila(first[1]), sevila(last[1])
    diff = {key: {m: round(after[key][m] - before[key][m], 2) for m in after[key]} for key in after if key in before}
    ks = sorted({key.split()[0] for key in diff})
    mean_diff = {k: {m: round(statistics.mean(after[key][m] for key in after if key.startswith(k + " "))
                              - statistics.mean(before[key][m] for key in before if key.startswith(k + " ")), 2)
                     for m in ("accuracy", "temporal", "action")} for k in ks}
    print(f"{'row':22s} {'passes':>6s} {'b1 median (range)':>22s} {'b32 median (range)':>22s}")
    for key, s in summary.items():
        print(f"{key:22s} {s['passes']:6d} {s['speedup_b1_median']:>8.2f}x ({s['speedup_b1_range'][0]}-{s['speedup_b1_range'][1]}) "
              f"{s['speedup_b32_median']:>8.2f}x ({s['speedup_b32_range'][0]}-{s['speedup_b32_range'][1]})")
    print("\nSeViLA-style rows, latest minus first version:")
    for key, d in diff.items():
        print(f"  {key}: " + ", ".join(f"{m} {v:+.2f}" for m, v in d.items()))
    for k, d in mean_diff.items():
        print(f"  {k} mean over seeds: " + ", ".join(f"{m} {v:+.2f}" for m, v in d.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "source": SOURCE,
                                     "versions": [c for c, _ in vs], "latency_passes": passes,
                                     "speedup_summary": summary,
                                     "sevila_rows": {"first_commit": first[0], "latest_commit": last[0],
                                                     "before": before, "after": after, "after_minus_before": diff,
                                                     "after_minus_before_mean_over_seeds": mean_diff}},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
