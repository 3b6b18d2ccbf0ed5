"""Question-answering metrics: accuracy (overall and per question type), the majority baselines every QA
number should be read against, and multiple-choice accuracy.

Accuracy is computed on answer strings after `normalize_answer` (`evl.data.answers`, where the answer
vocabulary lives), so a test answer outside the vocabulary counts as wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from evl.data.answers import most_frequent, normalize_answer

__all__ = ["majority_baseline", "mc_accuracy", "qa_accuracy"]

def _check_lengths(**named: Sequence | None) -> int:
    sizes = {k: len(v) for k, v in named.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"lengths differ: {sizes}; every question needs one entry in each")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("no questions to score")
    return n


def qa_accuracy(pred: Sequence[str], gold: Sequence[str], types: Sequence[str] | None = None) -> dict:
    """Exact-match accuracy (percent) after normalisation, overall and per question type.

    Returns ``{"accuracy", "count", "per_type": {type: acc}, "count_per_type": {type: n}}``
    (the per-type entries are empty when ``types`` is None).
    """
    n = _check_lengths(pred=pred, gold=gold, types=types)
    hits = [normalize_answer(p) == normalize_answer(g) for p, g in zip(pred, gold, strict=True)]
    out: dict = {"accuracy": 100.0 * sum(hits) / n, "count": n, "per_type": {}, "count_per_type": {}}
    if types is not None:
        by_type: dict[str, list[bool]] = {}
        for t, h in zip(types, hits, strict=True):
            by_type.setdefault(str(t), []).append(h)
        for t in sorted(by_type):
            out["per_type"][t] = 100.0 * sum(by_type[t]) / len(by_type[t])
            out["count_per_type"][t] = len(by_type[t])
    return out


def majority_baseline(
    train_answers: Sequence[str],
    test_answers: Sequence[str],
    test_types: Sequence[str] | None = None,
    train_types: Sequence[str] | None = None,
) -> dict:
    """Accuracy of answering every test question with the most frequent training answer.

    The result is :func:`qa_accuracy`'s dict plus ``"answer"``. When ``train_types`` is given (and
    ``test_types``), a second, stronger baseline is added under ``"per_type_majority"``: each question
    gets the most frequent training answer *of its type* (e.g. "what color" → "white"), falling back to the
    global one for a type unseen in training. Both use training answers only; taking majorities on the
    test set would leak the labels.
    """
    if not train_answers:
        raise ValueError("majority_baseline: no training answers")
    global_answer = most_frequent(Counter(normalize_answer(a) for a in train_answers))[0][0]
    out = qa_accuracy([global_answer] * len(test_answers), test_answers, test_types)
    out["answer"] = global_answer
    if train_types is not None and test_types is not None:
        _check_lengths(train_answers=train_answers, train_types=train_types)
        per_type_counts: dict[str, Counter] = {}
        for a, t in zip(train_answers, train_types, strict=True):
            per_type_counts.setdefault(str(t), Counter())[normalize_answer(a)] += 1
        answers = {t: most_frequent(c)[0][0] for t, c in per_type_counts.items()}
        preds = [answers.get(str(t), global_answer) for t in test_types]
        stronger = qa_accuracy(preds, test_answers, test_types)
        stronger["answers"] = answers
        out["per_type_majority"] = stronger
    return out


def mc_accuracy(scores: torch.Tensor, answer_index: torch.Tensor) -> float:
    """Multiple-choice accuracy (percent): the argmax option equals the answer. Ties go to the first option."""
    if scores.dim() != 2 or answer_index.shape != scores.shape[:1]:
        raise ValueError(
            f"mc_accuracy: expected scores (N, K) and answer_index (N,), got {tuple(scores.shape)} "
            f"and {tuple(answer_index.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("mc_accuracy: no questions to score")
    pred = scores.argmax(dim=1)
    return float((pred == answer_index.to(pred.device).long()).double().mean() * 100)
