"""`evl search INDEX_DIR "text"`: the videos (or segments) of an index that best match a text query.

The query is embedded by the index's own model (`info.model`), through the core's `embed_texts`,
and looked up in `index.faiss`. `rerank=K` re-scores the dual encoder's top K with the fusion model's
matching probability, re-decoding those K clips (EgoVLPv2's two-stage retrieval). An index answers only
queries of the model that built it: another model (other weights, embedding width or tokenizer) is
refused with both named. A damaged index raises IndexDamaged (rebuild with `evl index --rebuild`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from evl.errors import ConfigError, EvlError
from evl.search.index import IndexDamaged, connect, printable, read_info
from evl.search.vectors import DB_FILE, load_vectors

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 500
MAX_K = 1000


@dataclass
class Hit:
    item: int
    path: str
    start: float | None
    end: float | None
    score: float                     # dual cosine similarity, or the fusion match probability when re-ranked
    dual_score: float


class _Loaded(NamedTuple):
    """One consistent view of an index: its database connection, metadata, vectors and model."""
    db: sqlite3.Connection
    file_id: tuple[int, int]            # (device, inode) of meta.sqlite: a rebuilt index is another file
    info: dict[str, str]
    vectors: Any
    model: Any
    tokenizer: Any
    rebuilt: str | None                 # why the vectors were rebuilt from the stored embeddings, if they were


class SearchIndex:
    """An opened index: its metadata, vector index and model, ready for queries.

    A re-index of the folder while it is open (a running server) is picked up at the next query once
    `evl index` has finished (its vectors saved) or the index file was replaced (`--rebuild`); until
    then the vectors loaded earlier keep answering, and an item deleted since then is left out of the
    results (item ids are never reused, so a vector never names another item)."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None, backend: str | None = None):
        self.dir = Path(index_dir)
        self._model_arg = Path(model_dir) if model_dir is not None else None
        self._backend = backend                # None: the folder's own (torch checkpoint, onnx export)
        self._lock = threading.Lock()          # one sqlite connection shared by the server's threads
        self._reload = threading.Lock()
        self._refused: tuple | None = None     # the (file, tag) a reload failed on: not retried per query
        self._state = self._load(None)

    def _load(self, previous: _Loaded | None) -> _Loaded:
        from evl.api import load

        if not (self.dir / DB_FILE).is_file():
            raise ConfigError(f"{printable(self.dir)} is not an evl index (no {DB_FILE}); build one with "
                              "`evl index VIDEO_DIR --model CHECKPOINT --out INDEX_DIR`")
        st = os.stat(self.dir / DB_FILE)
        db = connect(self.dir, read_only=True)
        try:
            info = read_info(db)
            if "model_fingerprint" not in info:
                raise ConfigError(f"{printable(self.dir)}: the first `evl index` run into it stopped before it began; "
                                  "run it again")
            if previous is not None and previous.info.get("model_fingerprint") == info["model_fingerprint"]:
                model, tokenizer = previous.model, previous.tokenizer
            else:
                model_dir = self._model_arg or Path(info["model"])
                if not (model_dir / "config.json").is_file():
                    raise ConfigError(f"the index's model {printable(model_dir)} is gone (no config.json); pass --model "
                                      "with the checkpoint it was built with (a copy of it is fine)")
                same_folder = self._model_arg is None or self._model_arg.resolve() == Path(info["model"]).resolve()
                # by default, queries run on what built the index (e.g. onnx-int8 of an export folder)
                backend = self._backend or (info.get("backend") if same_folder else None)
                model = load(model_dir, backend)
                if not model.can("encode_text"):
                    raise ConfigError(f"--model {printable(model_dir)} is a {model.kind!r} model without a dual encoder; "
                                      "query with the checkpoint that built the index or its `evl export` folder")
                tokenizer = model.tokenizer
                self._check_model(info, model, tokenizer, model_dir)
            vectors, rebuilt = load_vectors(db, self.dir, info)
        except BaseException:
            db.close()
            raise
        return _Loaded(db, (st.st_dev, st.st_ino), info, vectors, model, tokenizer, rebuilt)

    def _check_model(self, info: dict[str, str], model, tokenizer, model_dir: Path) -> None:
        """The query model must be the one that built the index: same weights and tokenizer by content
        (a copied or moved checkpoint is the same model), same embedding width."""
        mine = {"embedding width": str(model.embed_dim), "weights fingerprint": model.weights_fingerprint,
                "tokenizer fingerprint": tokenizer.fingerprint}
        theirs = {"embedding width": info.get("embed_dim"), "weights fingerprint": info.get("model_fingerprint"),
                  "tokenizer fingerprint": info.get("tokenizer_fingerprint", mine["tokenizer fingerprint"])}
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            raise ConfigError(
                f"{printable(self.dir)} was built by {info.get('model')}; the query model {printable(model_dir)} differs in "
                + ", ".join(f"{k} ({theirs[k]} vs {mine[k]})" for k in differ)
                + ". Query with the model that built the index, or re-index with this one")

    def _current(self) -> _Loaded:
        """The loaded view, reloaded first when the index on disk has moved on (see the class doc)."""
        state = self._state
        try:
            st = os.stat(self.dir / DB_FILE)
            with self._lock:
                row = state.db.execute("SELECT value FROM info WHERE key = 'vectors_generation'").fetchone()
        except (OSError, sqlite3.Error):
            return state                       # being rebuilt right now: keep answering from what is loaded
        sig = ((st.st_dev, st.st_ino), row[0] if row else None)
        if sig == (state.file_id, state.info.get("vectors_generation")) or sig == self._refused:
            return state
        with self._reload:
            if self._state is not state:
                return self._state
            try:
                self._state = self._load(state)
            except EvlError as e:
                log.warning("%s changed on disk but cannot be loaded (%s); still answering from the earlier index",
                            self.dir, e)
                self._refused = sig
            return self._state

    def _rows(self, state: _Loaded, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            try:
                return state.db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise IndexDamaged(self.dir, e) from e

    @property
    def info(self) -> dict[str, str]:
        return self._current().info

    @property
    def rebuilt(self) -> str | None:
        """Why the vectors in use were rebuilt from the stored embeddings (None: index.faiss was current)."""
        return self._current().rebuilt

    def __len__(self) -> int:
        return int(self._current().vectors.ntotal)

    def search(self, query: str, k: int = 10, rerank: int = 0) -> list[Hit]:
        import torch

        from evl.tasks.evaluate import EvalSettings, embed_texts

        check_query(query, k, rerank)
        state = self._current()
        if rerank and state.model.backend != "torch":
            raise ConfigError(f"--rerank {rerank} runs the cross-modal (fusion) part, which is not exported; query with "
                              "the PyTorch checkpoint (--model CHECKPOINT), or leave --rerank out")
        if state.vectors.ntotal == 0:
            return []
        rerank = rerank if state.model.can("match") else 0
        if rerank:
            text = embed_texts(state.model.model, [query], state.tokenizer, EvalSettings(device="cpu"), keep_tokens=True)
            q = text.emb.float().numpy()
        else:
            q = state.model.encode_text([query]).numpy()
        shortlist = min(max(k, rerank), int(state.vectors.ntotal))
        scores, ids = state.vectors.search(np.ascontiguousarray(q, dtype=np.float32), shortlist)
        found = [int(i) for i in ids[0] if i >= 0]
        rows = {r[0]: r[1:] for r in self._rows(
            state, "SELECT i.id, v.path, i.start, i.end FROM items i JOIN videos v ON v.id = i.video_id "
            f"WHERE i.id IN ({','.join('?' * len(found))})", tuple(found))}
        # an item deleted by a re-index still running is left out (ids are never reused)
        hits = [Hit(int(i), *rows[int(i)], float(s), float(s)) for s, i in zip(scores[0], ids[0], strict=True)
                if int(i) in rows]
        if rerank and hits:
            with torch.no_grad():
                hits = self._rerank(state, text, hits[:rerank]) + hits[rerank:]
        return hits[:k]

    def window(self, item: int) -> tuple[float | None, float | None]:
        """(start, end) seconds of a segment item; (None, None) for a whole video."""
        rows = self._rows(self._current(), "SELECT start, end FROM items WHERE id = ?", (item,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def _rerank(self, state: _Loaded, text, hits: list[Hit]) -> list[Hit]:
        import torch

        from evl.data.annotations import Record
        from evl.data.datasets import clip_key
        from evl.tasks.evaluate import EvalSettings, embed_clips

        root = Path(state.info["root"])
        records = [Record(video=str(root / h.path), start=h.start, end=h.end) for h in hits]
        gallery = embed_clips(state.model.model, records, None, EvalSettings(device="cpu"), keep_tokens=True)
        where = {key: i for i, key in enumerate(gallery.keys)}
        keep = [(h, where[clip_key(r)]) for h, r in zip(hits, records, strict=True) if clip_key(r) in where]
        rows = torch.tensor([i for _, i in keep])
        logits = state.model.model.score_pairs(gallery.features.select(rows),
                                         text.select(torch.zeros(len(keep), dtype=torch.long)))
        prob = logits.float().softmax(dim=-1)[:, 1].tolist()
        reranked = [Hit(h.item, h.path, h.start, h.end, p, h.dual_score) for (h, _), p in zip(keep, prob, strict=True)]
        return sorted(reranked, key=lambda h: -h.score)

    def thumbnail(self, item: int) -> bytes | None:
        rows = self._rows(self._current(), "SELECT thumbnail FROM items WHERE id = ?", (item,))
        return rows[0][0] if rows else None

    def video_path(self, item: int) -> Path | None:
        """The file of an indexed item: only paths stored at indexing time, resolved under the root."""
        state = self._current()
        rows = self._rows(state, "SELECT v.path FROM items i JOIN videos v ON v.id = i.video_id WHERE i.id = ?", (item,))
        if not rows:
            return None
        root = Path(state.info["root"])
        path = (root / rows[0][0]).resolve()
        return path if path.is_relative_to(root.resolve()) and path.is_file() else None


def check_query(query: str, k: int, rerank: int) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("the query is empty; describe what the video shows, e.g. \"a red square grows\"")
    if len(query) > MAX_QUERY_CHARS:
        raise ConfigError(f"the query has {len(query)} characters; at most {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"-k {k}: must be between 1 and {MAX_K}")
    if not 0 <= rerank <= MAX_K:
        raise ConfigError(f"--rerank {rerank}: must be between 0 (off) and {MAX_K}")
