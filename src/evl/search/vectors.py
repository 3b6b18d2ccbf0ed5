"""The vector index of a search index folder: exact (`IndexFlatIP`) up to a size, IVF-Flat above it, its
recall measured against exact search, saved as index.faiss beside meta.sqlite and rebuilt in memory
when the saved one is behind the stored embeddings."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evl.errors import ConfigError

log = logging.getLogger(__name__)

DB_FILE, INDEX_FILE = "meta.sqlite", "index.faiss"


def load_embeddings(db: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = db.execute("SELECT id, embedding FROM items ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    emb = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
        else np.zeros((0, dim), np.float32)
    return ids, emb


def make_vector_index(emb: np.ndarray, ids: np.ndarray, approx_above: int, nprobe: int = 32):
    """Exact inner product (`IndexFlatIP`) up to `approx_above` vectors; above, an inverted-file index
    (IVF-Flat, ≈ 2·√N lists, k-means of 10 iterations on 64 vectors per list, `nprobe` lists searched): it builds
    in a fraction of HNSW's time, which matters because every `evl index` run rebuilds the index.
    Ids are the items' ids."""
    from evl.search import optional

    faiss = optional("faiss")
    n, dim = emb.shape
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if n > approx_above and n >= 1024:   # fewer vectors cannot train the lists: exact is cheap there anyway
        nlist = int(min(max(2 * np.sqrt(n), 16), n // 64))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.min_points_per_centroid = 1   # the sample is sized on purpose; do not warn about it
        sample = emb[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
        index.add_with_ids(emb, ids)
        return index
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if n:
        index.add_with_ids(emb, ids)
    return index


def recall_at_k(approx, exact_emb: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Fraction of the exact top-k found by the approximate index, averaged over `queries`."""
    scores = queries @ exact_emb.T
    k = min(k, len(ids))
    truth = ids[np.argsort(-scores, axis=1)[:, :k]]
    _, found = approx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found, strict=True)]))


RECALL_QUERIES_FILE = Path(__file__).with_name("recall_queries.txt")


def read_recall_queries(path: Path | None = None) -> list[str]:
    """Text queries for the build-time recall measurement: one per line, blank lines and `#` lines skipped."""
    src = Path(path) if path is not None else RECALL_QUERIES_FILE
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--recall-queries {src}: cannot read it ({e}); give a UTF-8 text file, one query per line") from e
    queries = [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]
    if not queries:
        raise ConfigError(f"--recall-queries {src}: no queries in it; give a text file with one query per line")
    return queries


def write_vector_index(db: sqlite3.Connection, out: Path, dim: int, approx_above: int,
                       queries: Callable[[], np.ndarray] | None = None) -> tuple[int, str, float | None]:
    """Rebuild index.faiss from the stored embeddings (atomically); returns (items, kind, recall@10).
    The recall of an approximate index is measured with `queries()` (text-query embeddings, computed only
    when the index is approximate) against exact search; without them it is not measured (None). Stored
    video vectors are not used as queries: each sits in a probed list by construction, so they overstate it."""
    from evl.search import optional

    faiss = optional("faiss")
    generation, ids, emb = read_snapshot(db, dim)
    index = make_vector_index(emb, ids, approx_above)
    kind, recall = ("ivf", None) if "IVF" in type(index).__name__ else ("exact", None)
    if kind == "ivf" and queries is not None:
        recall = round(recall_at_k(index, emb, ids, np.ascontiguousarray(queries(), dtype=np.float32)), 4)
    tmp = out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)
    # a kill between the replace and this commit leaves the tag behind the file: the next open rebuilds
    db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [("kind", kind), ("recall_at_10", str(recall)),
                                                                ("vectors_generation", generation)])
    db.commit()
    return len(ids), kind, recall


def read_snapshot(db: sqlite3.Connection, dim: int) -> tuple[str | None, np.ndarray, np.ndarray]:
    """(generation, item ids, embeddings) read in one transaction: the three belong together."""
    own = not db.in_transaction
    if own:
        db.execute("BEGIN")
    try:
        row = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        ids, emb = load_embeddings(db, dim)
    finally:
        if own:
            db.execute("COMMIT")
    return (row[0] if row else None), ids, emb


def load_vectors(db: sqlite3.Connection, index_dir: Path, info: dict[str, str]) -> tuple[object, str | None]:
    """The vector index for the items in `db`: index.faiss when it was built from the current generation
    of items, else rebuilt in memory from the stored embeddings (returned reason: why)."""
    from evl.search import optional

    faiss = optional("faiss")
    dim = int(info["embed_dim"])
    generation, ids, emb = read_snapshot(db, dim)
    if generation is not None and info.get("vectors_generation") == generation:
        try:
            vectors = faiss.read_index(str(Path(index_dir) / INDEX_FILE))
            if vectors.d == dim and vectors.ntotal == len(ids):
                return vectors, None
            why = f"{INDEX_FILE} holds {vectors.ntotal} vectors of width {vectors.d}, {DB_FILE} {len(ids)} of width {dim}"
        except (RuntimeError, OSError) as e:   # faiss raises RuntimeError on a missing or malformed file
            why = f"{INDEX_FILE} is unreadable ({str(e).strip().splitlines()[-1] if str(e).strip() else e})"
    else:
        why = f"{INDEX_FILE} is behind {DB_FILE} (an `evl index` run was interrupted, or is running)"
    log.warning("%s: %s; the vectors were rebuilt from the stored embeddings (run `evl index` to save them)",
                index_dir, why)
    return make_vector_index(emb, ids, int(info.get("approx_above", 100_000))), why
