"""Vector index at scale: build time, memory and query latency for 10k / 100k / 1M embeddings,
exact (`IndexFlatIP`) against the approximate index `evl index` uses above `--approx-above` (IVF-Flat),
with the approximate index's recall@10 against exact search.

The embeddings are synthetic but shaped like real ones: unit vectors of width 256 (the tiny model's
embedding width) drawn around 1,000 cluster centres, queries = held-out points of the same clusters.
Build time includes training the IVF quantizer; memory = the serialised index size; latency =
median of single queries and throughput of one 256-query batch, `--threads` faiss threads.

Real queries are text (`--real-model CKPT`, part 2). `evl index` prints an IVF recall@10 measured with 200
of the *stored video vectors* as queries — each query is itself in the index, and its own list is always
probed. A user's query is a caption embedded by the text tower, which sits elsewhere in the embedding space
(the modality gap). Part 2 indexes `--real-clips` generated SynthVL clips (seed `--real-seed`, not the data
the checkpoint was trained on, so every caption is held out) with `evl index`'s own `build_index`, rebuilds
the IVF index `evl index` builds over the stored embeddings, and measures recall@10 against exact search
with (a) 200 stored video vectors, drawn as `evl index` draws them, and (b) `--real-queries` of the
clips' captions embedded by the checkpoint's text tower, side by side.

Usage: python benchmarks/search_scale.py [--sizes 10000 100000 1000000] [--dim 256] [--threads 2]
       [--real-model CKPT [--real-clips 10000] [--real-queries 1000] [--real-work DIR]] [--skip-synthetic]
Prints a table and writes benchmarks/results/search_scale.json (a part that is skipped keeps its rows
from the previous JSON).
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


def text_query_recall(model_dir: Path, clips: int, seed: int, n_queries: int, work: Path) -> dict:
    """Part 2: IVF recall@10 with stored video vectors vs held-out caption embeddings as queries."""
    import sqlite3

    from evl.data.annotations import read_annotations
    from evl.data.synthetic import write_synthvl
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.search.index import build_index
    from evl.search.vectors import DB_FILE, load_embeddings, make_vector_index, recall_at_k
    from evl.tasks.evaluate import EvalSettings, embed_texts

    data = work / f"synthvl-{clips}-s{seed}"
    if not (data / "meta.json").is_file():
        write_synthvl(data, clips=clips, seed=seed, workers=2)
    t0 = time.perf_counter()
    report = build_index(data / "videos", model_dir, work / f"index-{clips}-s{seed}", approx_above=clips - 1)
    index_s = time.perf_counter() - t0
    model = VideoLanguageModel.from_pretrained(model_dir).eval()
    dim = model.cfg.embed_dim
    db = sqlite3.connect(work / f"index-{clips}-s{seed}" / DB_FILE)
    ids, emb = load_embeddings(db, dim)
    item_video = dict(db.execute("SELECT items.id, videos.path FROM items JOIN videos ON items.video_id = videos.id"))
    index = make_vector_index(emb, ids, approx_above=len(ids) - 1)   # what `evl index` builds above the limit
    rng = np.random.default_rng(0)   # the draw write_vector_index makes
    stored = emb[rng.choice(len(ids), size=min(200, len(ids)), replace=False)]
    records = [r for split in ("pretrain.json",) for r in read_annotations(data / "annotations" / split)]
    pairs = [(c, Path(r.video).name) for r in records for c in r.captions]
    captions = [c for c, _ in pairs]
    pick = np.random.default_rng(1).choice(len(captions), size=min(n_queries, len(captions)), replace=False)
    tok = tokenizer_for(model.cfg, model_dir)
    text = embed_texts(model, [captions[i] for i in pick], tok, EvalSettings(device="cpu")).emb.float().numpy()
    text = np.ascontiguousarray(text, dtype=np.float32)
    # where the queries sit: mean cosine to their nearest stored vector
    nearest_text = float(np.mean(np.max(text @ emb.T, axis=1)))
    nearest_stored = float(np.mean(np.sort(stored @ emb.T, axis=1)[:, -2]))   # the nearest *other* vector
    # sanity: does exact search find the caption's own clip (the model is trained, the queries are real)
    top = ids[np.argsort(-(text @ emb.T), axis=1)[:, :10]]
    own = [pairs[i][1] for i in pick]
    hit10 = float(np.mean([o in {Path(item_video[int(t)]).name for t in row} for o, row in zip(own, top, strict=True)]))
    return {"model": str(model_dir), "clips": clips, "synth_seed": seed, "items": int(len(ids)),
            "nlist": int(index.nlist), "nprobe": int(index.nprobe), "index_build_s": round(index_s, 1),
            "evl_index_reported_recall_at_10": report.recall_at_10,
            "recall_at_10_stored_video_queries": round(recall_at_k(index, emb, ids, stored), 4),
            "recall_at_10_text_queries": round(recall_at_k(index, emb, ids, text), 4),
            "text_queries": len(pick), "stored_queries": len(stored),
            "mean_top1_cosine_text_query": round(nearest_text, 4),
            "mean_top1_cosine_stored_query_excluding_itself": round(nearest_stored, 4),
            "exact_text_to_video_r10_own_clip": round(100 * hit10, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--skip-synthetic", action="store_true", help="keep part 1's rows from the previous JSON")
    ap.add_argument("--real-model", type=Path, default=None, help="a checkpoint: run part 2 (text queries)")
    ap.add_argument("--real-clips", type=int, default=10_000)
    ap.add_argument("--real-seed", type=int, default=7)
    ap.add_argument("--real-queries", type=int, default=1000)
    ap.add_argument("--real-work", type=Path, default=None)
    args = ap.parse_args()
    import tempfile

    import faiss

    from evl.precision import cpu_info
    from evl.search.vectors import make_vector_index, recall_at_k

    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[0], precision="fp32")   # embeddings and queries from numpy seed 0
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim)).astype(np.float32)
    queries = clustered(256, args.dim, rng, centres)
    rows = []
    for n in [] if args.skip_synthetic else args.sizes:
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
    if args.skip_synthetic:
        rows = previous.get("rows", [])
    real = previous.get("text_queries")
    if args.real_model:
        if args.real_work:
            args.real_work.mkdir(parents=True, exist_ok=True)
            real = text_query_recall(args.real_model, args.real_clips, args.real_seed, args.real_queries, args.real_work)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                real = text_query_recall(args.real_model, args.real_clips, args.real_seed, args.real_queries, Path(tmp))
        real = {"meta": finish_meta(meta), **real}
        print(json.dumps(real), flush=True)
    info = cpu_info()
    print(f"\nCPU: {info['model']} ({info['capability']}, {info['cores']} cores), faiss {faiss.__version__}, "
          f"{args.threads} threads, width {args.dim}")
    head = f"{'n':>9s} {'index':>6s} {'build s':>8s} {'MB':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch q/s':>10s} {'recall@10':>9s}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['n']:>9d} {r['kind']:>6s} {r['build_s']:>8.2f} {r['index_mb']:>7.1f} {r['query_ms_p50']:>8.3f} "
              f"{r['query_ms_p99']:>8.3f} {r['batch_queries_per_s']:>10.1f} {r['recall_at_10']:>9.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    synthetic_meta = previous.get("meta") if args.skip_synthetic else finish_meta(meta)
    args.json.write_text(json.dumps({"meta": synthetic_meta, "cpu": info, "faiss": faiss.__version__,
                                     "settings": (previous.get("settings") if args.skip_synthetic
                                                  else vars(args) | {"json": None}),
                                     "rows": rows, "text_queries": real}, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
