"""Vector index at scale: build time, memory and query latency for 10k / 100k / 1M embeddings,
exact (`IndexFlatIP`) against the approximate index `evl index` uses above `--approx-above` (IVF-Flat),
with the approximate index's recall@10 against exact search.

The embeddings are synthetic but shaped like real ones: unit vectors of width 256 (the tiny model's
embedding width) drawn around 1,000 cluster centres, queries = held-out points of the same clusters.
Build time includes training the IVF quantizer; memory = the serialised index size; latency =
median of single queries and throughput of one 256-query batch, `--threads` faiss threads.

Usage: python benchmarks/search_scale.py [--sizes 10000 100000 1000000] [--dim 256] [--threads 2]
Prints a table and writes benchmarks/results/search_scale.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_scale.json"


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim) * 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def measure(index, queries: np.ndarray, k: int = 10) -> dict:
    singles = []
    for q in queries[:200]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(queries, k)
    batch = time.perf_counter() - t0
    return {"query_ms_p50": round(1000 * statistics.median(singles), 3),
            "query_ms_p99": round(1000 * float(np.percentile(singles, 99)), 3),
            "batch_queries_per_s": round(len(queries) / batch, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    import faiss

    from evl.precision import cpu_info
    from evl.search.index import make_vector_index, recall_at_k

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim)).astype(np.float32)
    queries = clustered(256, args.dim, rng, centres)
    rows = []
    for n in args.sizes:
        emb = clustered(n, args.dim, rng, centres)
        ids = np.arange(n, dtype=np.int64)
        exact = None
        for kind, approx_above in (("exact", n), ("ivf", n - 1)):
            t0 = time.perf_counter()
            index = make_vector_index(emb, ids, approx_above)
            build = time.perf_counter() - t0
            row = {"n": n, "kind": kind, "build_s": round(build, 2),
                   "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1), **measure(index, queries)}
            if kind == "exact":
                exact = index
                row["recall_at_10"] = 1.0
            else:
                row["recall_at_10"] = round(recall_at_k(index, emb, ids, queries), 4)
                row["nlist"], row["nprobe"] = int(index.nlist), int(index.nprobe)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del exact, emb
    info = cpu_info()
    print(f"\nCPU: {info['model']} ({info['capability']}, {info['cores']} cores), faiss {faiss.__version__}, "
          f"{args.threads} threads, width {args.dim}")
    head = f"{'n':>9s} {'index':>6s} {'build s':>8s} {'MB':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch q/s':>10s} {'recall@10':>9s}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['n']:>9d} {r['kind']:>6s} {r['build_s']:>8.2f} {r['index_mb']:>7.1f} {r['query_ms_p50']:>8.3f} "
              f"{r['query_ms_p99']:>8.3f} {r['batch_queries_per_s']:>10.1f} {r['recall_at_10']:>9.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": info, "faiss": faiss.__version__, "settings": vars(args) | {"json": None},
                                     "rows": rows}, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
