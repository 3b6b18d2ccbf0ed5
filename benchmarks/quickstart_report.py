"""`evl quickstart` as a benchmark: run it, and commit its report as benchmarks/results/quickstart_<cpu-kind>.json.

The quickstart's own `report.json` holds the figures (retrieval, QA, MC, per-type and compositional
splits, parameters, GFLOPs, stage times, the CPU and the training precision). This wrapper runs
`evl quickstart --out OUT [ARGS...]`, then writes that report beside the run's metadata (command, git
commit, CPU kind, precision, seed, date, load before and after, wall time) and the printed table, to
benchmarks/results/quickstart_<kind>.json, where <kind> names the CPU kind: torch's SIMD capability in
lower case, plus "-amx" or "-avx512bf16" when the CPU has those bf16 units (e.g. quickstart_avx512.json,
quickstart_avx2.json, quickstart_avx512-amx.json). One report per CPU kind; a new run replaces the
report of its kind.

`--table A.json B.json ...` prints those reports side by side as a markdown table (before/after).

Usage: python benchmarks/quickstart_report.py [--out runs/qs_avx512] [--tag NAME] [-- extra evl quickstart arguments]
(`--tag dense -- --pretrain-recipe pretrain-tiny` keeps the dense baseline's report beside the main one.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_kind(info: dict) -> str:
    kind = str(info.get("capability") or "unknown").lower()
    flags = info.get("flags_bf16") or []
    if "amx_bf16" in flags:
        kind += "-amx"
    elif "avx512_bf16" in flags:
        kind += "-avx512bf16"
    return kind


def markdown_table(paths: list[Path]) -> str:
    """One markdown row per committed quickstart report (the docs' before/after tables)."""
    head = ("| report | commit | CPU, precision | pre-training | train / test clips | pre-train s | wall s "
            "| t2v R@1 | R@10 | held-out / seen R@1 | QA | per-type majority | MC (chance 20) |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for path in paths:
        d = json.loads(Path(path).read_text())
        meta, rep = d["meta"], d["report"]
        steps = rep.get("train", {}).get("steps", {}).get("pretrain")
        split = rep.get("data", {}).get("splits", {})
        comp = rep.get("compositional", {})
        held = "/".join(f"{comp[k]['t2v_r1']:.1f}" for k in ("held_out", "seen") if k in comp) or "—"
        r, q = rep["retrieval"], rep["qa"]
        rows.append(f"| `{Path(path).name}` | {meta['git_commit'][:7]} | {meta['cpu']['model'].split('(')[0].strip()} "
                    f"{meta['cpu_kind']}, {rep['machine']['precision']} | {rep.get('pretrain_recipe', 'pretrain-tiny')}"
                    f"{f' ({steps} steps)' if steps else ''} | {split.get('train', '?')} / {split.get('test', '?')} "
                    f"| {rep['time_s']['pretrain']:.0f} | {meta['wall_s']:.0f} | {r['t2v_r1']:.1f} | {r['t2v_r10']:.1f} "
                    f"| {held} | {q['accuracy']:.1f} | {q['baseline']['per_type_majority']['accuracy']:.1f} "
                    f"| {rep['mc']['accuracy']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        print(markdown_table([Path(p) for p in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="quickstart output folder (default runs/qs_<kind>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="written to quickstart_<kind>_<tag>.json instead (e.g. a baseline run)")
    ap.add_argument("extra", nargs="*", help="further `evl quickstart` arguments (after --)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[args.seed])
    kind = cpu_kind(meta["cpu"])
    out = args.out or Path("runs") / f"qs_{kind.split('-')[0]}"
    cmd = [str(Path(sys.executable).with_name("evl")), "quickstart", "--out", str(out), "--seed", str(args.seed),
           *args.extra]
    meta["quickstart_command"] = " ".join(["evl", *cmd[1:]])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"evl quickstart failed (exit {proc.returncode})")
    report = json.loads((out / "report.json").read_text())
    table = proc.stdout[proc.stdout.find("evl quickstart —"):] if "evl quickstart —" in proc.stdout else proc.stdout
    dest = HERE / "results" / f"quickstart_{kind}{'_' + args.tag if args.tag else ''}.json"
    dest.write_text(json.dumps({"meta": {**finish_meta(meta), "cpu_kind": kind, "quickstart_wall_s": round(wall, 1)},
                                "report": report, "printed": table.splitlines()}, indent=2, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
