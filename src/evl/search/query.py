"""`evl search INDEX_DIR "text"`: the videos (or segments) of an index that best match a text query.

The query is embedded by the index's own model (`info.model`), through the core's `embed_texts`,
and looked up in `index.faiss`. `rerank=K` re-scores the dual encoder's top K with the fusion model's
matching probability, re-decoding those K clips (EgoVLPv2's two-stage retrieval). An index answers only
queries of the model that built it: another model (other weights, embedding width or tokenizer) is
refused with both named.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evl.errors import ConfigError
from evl.search.index import DB_FILE, INDEX_FILE, model_fingerprint, read_info

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


class SearchIndex:
    """An opened index: its metadata, vector index and model, ready for queries."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None):
        from evl.search import optional

        faiss = optional("faiss")
        from evl.data.text import tokenizer_for, tokenizer_name
        from evl.models.model import VideoLanguageModel

        self.dir = Path(index_dir)
        if not (self.dir / DB_FILE).is_file() or not (self.dir / INDEX_FILE).is_file():
            raise ConfigError(f"{self.dir} is not an evl index (no {DB_FILE} / {INDEX_FILE}); build one with "
                              "`evl index VIDEO_DIR --model CHECKPOINT --out INDEX_DIR`")
        # one connection shared by the server's worker threads, used under a lock
        self.db = sqlite3.connect(self.dir / DB_FILE, check_same_thread=False)
        self._lock = threading.Lock()
        self.info = read_info(self.db)
        model_dir = Path(model_dir or self.info["model"])
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"the index's model {model_dir} is gone (no config.json); pass --model with the "
                              "checkpoint it was built with")
        self.model = VideoLanguageModel.from_pretrained(model_dir).eval()
        self.tokenizer = tokenizer_for(self.model.cfg, model_dir)
        mine = (str(self.model.cfg.embed_dim), tokenizer_name(self.tokenizer), model_fingerprint(model_dir))
        theirs = (self.info.get("embed_dim"), self.info.get("tokenizer"), self.info.get("model_fingerprint"))
        if mine != theirs:
            raise ConfigError(
                f"{self.dir} was built by {self.info.get('model')} (embedding width {theirs[0]}, tokenizer {theirs[1]}, "
                f"fingerprint {theirs[2]}); the query model {model_dir} has width {mine[0]}, tokenizer {mine[1]}, "
                f"fingerprint {mine[2]}. Query with the model that built the index, or re-index with this one")
        self.vectors = faiss.read_index(str(self.dir / INDEX_FILE))
        self.root = Path(self.info["root"])

    def __len__(self) -> int:
        return int(self.vectors.ntotal)

    def search(self, query: str, k: int = 10, rerank: int = 0) -> list[Hit]:
        import torch

        from evl.tasks.evaluate import EvalSettings, embed_texts

        check_query(query, k, rerank)
        text = embed_texts(self.model, [query], self.tokenizer, EvalSettings(device="cpu"), keep_tokens=rerank > 0)
        q = text.emb.float().numpy()
        shortlist = max(k, rerank)
        scores, ids = self.vectors.search(np.ascontiguousarray(q, dtype=np.float32), min(shortlist, len(self)))
        hits = [self._hit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        if rerank and hits and self.model.has_fusion:
            with torch.no_grad():
                hits = self._rerank(text, hits[:rerank]) + hits[rerank:]
        return hits[:k]

    def _row(self, sql: str, item: int) -> tuple | None:
        with self._lock:
            return self.db.execute(sql, (item,)).fetchone()

    def _hit(self, item: int, score: float) -> Hit:
        path, start, end = self._row("SELECT v.path, i.start, i.end FROM items i JOIN videos v ON v.id = i.video_id "
                                     "WHERE i.id = ?", item)
        return Hit(item, path, start, end, score, score)

    def window(self, item: int) -> tuple[float | None, float | None]:
        """(start, end) seconds of a segment item; (None, None) for a whole video."""
        row = self._row("SELECT start, end FROM items WHERE id = ?", item)
        return (row[0], row[1]) if row else (None, None)

    def _rerank(self, text, hits: list[Hit]) -> list[Hit]:
        from evl.data.annotations import Record
        from evl.tasks.evaluate import EvalSettings, embed_clips

        records = [Record(video=str(self.root / h.path), start=h.start, end=h.end) for h in hits]
        gallery = embed_clips(self.model, records, None, EvalSettings(device="cpu"), keep_tokens=True)
        from evl.data.datasets import clip_key

        where = {key: i for i, key in enumerate(gallery.keys)}
        keep = [(h, where[clip_key(r)]) for h, r in zip(hits, records, strict=True) if clip_key(r) in where]
        import torch

        rows = torch.tensor([i for _, i in keep])
        logits = self.model.score_pairs(gallery.features.select(rows), text.select(torch.zeros(len(keep), dtype=torch.long)))
        prob = logits.float().softmax(dim=-1)[:, 1].tolist()
        reranked = [Hit(h.item, h.path, h.start, h.end, p, h.dual_score) for (h, _), p in zip(keep, prob, strict=True)]
        return sorted(reranked, key=lambda h: -h.score)

    def thumbnail(self, item: int) -> bytes | None:
        row = self._row("SELECT thumbnail FROM items WHERE id = ?", item)
        return row[0] if row else None

    def video_path(self, item: int) -> Path | None:
        """The file of an indexed item: only paths stored at indexing time, resolved under the root."""
        row = self._row("SELECT v.path FROM items i JOIN videos v ON v.id = i.video_id WHERE i.id = ?", item)
        if row is None:
            return None
        path = (self.root / row[0]).resolve()
        return path if path.is_relative_to(self.root.resolve()) and path.is_file() else None


def check_query(query: str, k: int, rerank: int) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("the query is empty; describe what the video shows, e.g. \"a red square grows\"")
    if len(query) > MAX_QUERY_CHARS:
        raise ConfigError(f"the query has {len(query)} characters; at most {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"-k {k}: must be between 1 and {MAX_K}")
    if not 0 <= rerank <= MAX_K:
        raise ConfigError(f"--rerank {rerank}: must be between 0 (off) and {MAX_K}")
