"""Retrieval metrics: recall@K, median and mean rank for text→video and video→text, and fusion re-ranking.

Everything is computed in chunks of queries so a 100k × 100k evaluation never materialises the full
similarity matrix: peak extra memory is about ``chunk_size × N_gallery`` floats (4096 × 100k × 4 bytes
≈ 1.6 GB; lower ``chunk_size`` on small machines), plus a bool mask of the same shape for video→text.

Scores are plain dot products: pass L2-normalised embeddings for cosine similarity.

Ranks are 1-based. Ties: with ``ties="optimistic"`` (default, the common convention) the rank of the
ground truth is 1 + the number of *wrong* gallery items scoring strictly higher, so a tie is resolved in
favour of the ground truth. Beware: a collapsed model whose embeddings are all equal then scores
R@1 = 100. ``ties="pessimistic"`` counts wrong items scoring greater *or equal* instead, which scores
such a model at the bottom; report it when ties are plausible (e.g. quantised scores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "chance_recall",
    "recall_summary",
    "rerank_t2v",
    "retrieval_metrics",
    "similarity_topk",
    "text_to_video_ranks",
    "video_to_text_ranks",
]

RECALL_KS = (1, 5, 10)
_TIES = ("optimistic", "pessimistic")


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_gallery(query: torch.Tensor, gallery: torch.Tensor) -> None:
    _check_2d("query_emb", query)
    _check_2d("gallery_emb", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery embedding widths differ: expected D={query.shape[1]}, got {gallery.shape[1]}"
        )


@torch.no_grad()
def similarity_topk(
    query_emb: torch.Tensor, gallery_emb: torch.Tensor, k: int, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items by dot product for every query: (scores (Nq, k), indices (Nq, k)), best first.

    ``k`` larger than the gallery is clamped to the gallery size. Memory: chunk_size × Ng floats.
    """
    _check_gallery(query_emb, gallery_emb)
    _check_chunk(chunk_size)
    k = min(int(k), gallery_emb.shape[0])
    if k < 1:
        raise ValueError(
            f"k must be >= 1 and the gallery non-empty, got k={k}, gallery size {gallery_emb.shape[0]}"
        )
    scores, indices = [], []
    for start in range(0, query_emb.shape[0], chunk_size):
        sim = query_emb[start : start + chunk_size] @ gallery_emb.t()
        s, i = sim.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    if not scores:
        empty = query_emb.new_zeros((0, k))
        return empty, empty.long()
    return torch.cat(scores), torch.cat(indices)


def _count_above(sim: torch.Tensor, gt_score: torch.Tensor, wrong: torch.Tensor, ties: str) -> torch.Tensor:
    """1 + number of wrong gallery items beating (or, pessimistically, matching) the ground truth."""
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    beats = sim > gt_score[:, None] if ties == "optimistic" else sim >= gt_score[:, None]
    return 1 + (beats & wrong).sum(dim=1)


def _check_mapping(
    text_emb: torch.Tensor, video_emb: torch.Tensor, text_to_video: torch.Tensor
) -> torch.Tensor:
    _check_gallery(text_emb, video_emb)
    text_to_video = torch.as_tensor(text_to_video, dtype=torch.long, device=text_emb.device)
    if text_to_video.shape != (text_emb.shape[0],):
        raise ValueError(
            f"text_to_video must give one video index per caption: expected shape ({text_emb.shape[0]},), "
            f"got {tuple(text_to_video.shape)}"
        )
    if text_to_video.numel() and (text_to_video.min() < 0 or text_to_video.max() >= video_emb.shape[0]):
        raise ValueError(
            f"text_to_video indices must lie in [0, {video_emb.shape[0]}), "
            f"got range [{int(text_to_video.min())}, {int(text_to_video.max())}]"
        )
    return text_to_video


def _best_correct_ranks(query: torch.Tensor, gallery: torch.Tensor,
                        correct: Callable[[int, int], torch.Tensor], chunk_size: int, ties: str) -> torch.Tensor:
    """1-based rank of the best-scoring correct gallery item of each query, in chunks of queries.

    `correct(start, end)` gives the (end-start, N_gallery) bool mask of correct items for those queries;
    other correct items never count as errors. Queries with no correct item get rank 0.
    """
    ranks = []
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ gallery.t()
        ok = correct(start, start + sim.shape[0])
        best = sim.masked_fill(~ok, float("-inf")).max(dim=1).values
        rank = _count_above(sim, best, ~ok, ties)
        ranks.append(torch.where(ok.any(dim=1), rank, torch.zeros_like(rank)))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def text_to_video_ranks(
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    text_to_video: torch.Tensor,
    chunk_size: int = 4096,
    ties: str = "optimistic",
) -> torch.Tensor:
    """1-based rank (Nt,) of each caption's ground-truth video among all videos."""
    _check_chunk(chunk_size)
    text_to_video = _check_mapping(text_emb, video_emb, text_to_video)
    videos = torch.arange(video_emb.shape[0], device=text_emb.device)
    return _best_correct_ranks(text_emb, video_emb, lambda s, e: text_to_video[s:e, None] == videos[None, :],
                               chunk_size, ties)


@torch.no_grad()
def video_to_text_ranks(
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    text_to_video: torch.Tensor,
    chunk_size: int = 4096,
    ties: str = "optimistic",
) -> torch.Tensor:
    """1-based rank (Nv,) of each video's best-ranked caption among all captions.

    A video is retrieved correctly at the best rank of any of its captions (its other captions do not
    count as errors). Videos with no caption have no defined rank and get 0; callers filter them.
    """
    _check_chunk(chunk_size)
    text_to_video = _check_mapping(text_emb, video_emb, text_to_video)

    def correct(s: int, e: int) -> torch.Tensor:
        return text_to_video[None, :] == torch.arange(s, e, device=text_emb.device)[:, None]

    return _best_correct_ranks(video_emb, text_emb, correct, chunk_size, ties)


def recall_summary(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """R@K (percent), median and mean rank of 1-based ranks, keys like ``{prefix}_r1``, ``{prefix}_medr``."""
    if ranks.numel() == 0:
        raise ValueError(f"no {prefix} queries to score (empty ranks)")
    r = ranks.detach().cpu().double()
    out = {f"{prefix}_r{k}": float((r <= k).double().mean() * 100) for k in ks}
    out[f"{prefix}_medr"] = float(np.median(r.numpy()))
    out[f"{prefix}_meanr"] = float(r.mean())
    return out


def retrieval_metrics(
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    text_to_video: torch.Tensor,
    chunk_size: int = 4096,
    ties: str = "optimistic",
) -> dict[str, float]:
    """Text→video and video→text R@1/5/10 (percent), median and mean rank.

    ``text_to_video[i]`` is the index of caption i's video; several captions per video are allowed
    (t2v scores each caption; v2t scores each video at its best caption). Videos without a caption are
    left out of v2t. Also reports ``t2v_num_queries`` and ``v2t_num_queries``.
    """
    t2v = text_to_video_ranks(text_emb, video_emb, text_to_video, chunk_size, ties)
    v2t = video_to_text_ranks(text_emb, video_emb, text_to_video, chunk_size, ties)
    v2t = v2t[v2t > 0]
    out = recall_summary(t2v, "t2v")
    out.update(recall_summary(v2t, "v2t"))
    out["t2v_num_queries"] = float(t2v.numel())
    out["v2t_num_queries"] = float(v2t.numel())
    return out


@torch.no_grad()
def rerank_t2v(
    dual_scores_topk_indices: torch.Tensor,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    text_to_video: torch.Tensor,
    batch_size: int = 1024,
    ties: str = "optimistic",
) -> dict[str, float]:
    """Re-rank each caption's dual-encoder top-k videos with a (costly) fusion score; report t2v R@1/5/10.

    This is the usual two-stage retrieval: a cheap dual encoder shortlists k videos per caption, the
    fusion encoder scores only those Nt·k pairs. ``score_fn(text_idx, video_idx) -> scores (N,)`` is
    called on flat batches of at most ``batch_size`` pairs. A ground truth outside the shortlist is a
    miss (rank > k), so R@K for K ≥ k equals the shortlist's recall. Also returns ``rerank_k`` and
    ``t2v_in_topk`` (percent of captions whose video made the shortlist).
    """
    idx = dual_scores_topk_indices
    _check_2d("dual_scores_topk_indices", idx)
    nt, k = idx.shape
    text_to_video = torch.as_tensor(text_to_video, dtype=torch.long, device=idx.device)
    if text_to_video.shape != (nt,):
        raise ValueError(
            f"text_to_video must have shape ({nt},) to match the top-k rows, got {tuple(text_to_video.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    text_flat = torch.arange(nt, device=idx.device).repeat_interleave(k)
    video_flat = idx.reshape(-1).long()
    parts = []
    for start in range(0, text_flat.numel(), batch_size):
        s = score_fn(text_flat[start : start + batch_size], video_flat[start : start + batch_size])
        parts.append(torch.as_tensor(s).reshape(-1).float().to(idx.device))
    fused = torch.cat(parts).reshape(nt, k) if parts else torch.zeros(nt, k)
    correct = idx.long() == text_to_video[:, None]
    in_topk = correct.any(dim=1)
    best = fused.masked_fill(~correct, float("-inf")).max(dim=1).values
    rank = _count_above(fused, best, ~correct, ties).double()
    # A miss is beyond the shortlist at an unknown rank: infinite, so it never counts for any K.
    rank = torch.where(in_topk, rank, torch.full_like(rank, float("inf")))
    out = {f"t2v_r{kk}": float((rank <= kk).double().mean() * 100) for kk in RECALL_KS}
    out["rerank_k"] = float(k)
    out["t2v_in_topk"] = float(in_topk.double().mean() * 100)
    return out


def chance_recall(num_videos: int, k: int) -> float:
    """Recall@k (percent) of a random ranking: 100·k / num_videos, capped at 100."""
    if num_videos < 1 or k < 1:
        raise ValueError(f"chance_recall needs num_videos >= 1 and k >= 1, got {num_videos} and {k}")
    return 100.0 * min(k, num_videos) / num_videos
