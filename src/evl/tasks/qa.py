"""Question-answering metrics: the answer vocabulary of open-ended QA, accuracy (overall and per question
type), the majority baselines every QA number should be read against, and multiple-choice accuracy.

Open-ended video QA (MSRVTT-QA, MSVD-QA, ...) is usually solved as classification over the most
frequent training answers; a test answer outside that vocabulary can never be predicted, which is why
:meth:`AnswerVocab.encode` maps it to ``-100`` (ignored by the loss) and accuracy is still computed on
strings, counting those questions as wrong.

Answers are compared after :func:`normalize_answer` (strip, lower-case, collapse spaces) so that
"Dog " and "dog" are the same answer in the vocabulary and in accuracy.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "UNKNOWN_ANSWER_ID",
    "AnswerVocab",
    "majority_baseline",
    "mc_accuracy",
    "normalize_answer",
    "qa_accuracy",
]

UNKNOWN_ANSWER_ID = -100  # matches the ignore_index of evl.losses.functional.qa_loss


def normalize_answer(answer: str) -> str:
    """Canonical form used everywhere an answer is compared: stripped, lower-case, single spaces."""
    return " ".join(str(answer).lower().split())


def _most_frequent(counts: Counter) -> list[tuple[str, int]]:
    """Most frequent first; ties alphabetical so the vocabulary (and class ids) are deterministic."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass
class AnswerVocab:
    """Answer string ↔ class id, most frequent training answer first (id 0)."""

    answers: list[str]
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.answers = [normalize_answer(a) for a in self.answers]
        self._index = {a: i for i, a in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            dup = [a for a, c in Counter(self.answers).items() if c > 1]
            raise ValueError(f"AnswerVocab: duplicate answers after normalisation: {dup[:5]}")

    @classmethod
    def build(
        cls, train_answers: Iterable[str], min_count: int = 1, max_size: int | None = None
    ) -> AnswerVocab:
        """Vocabulary of training answers seen at least ``min_count`` times, at most ``max_size`` of them.

        Capping the vocabulary (commonly 1,000–1,500 answers) drops the long tail that a classifier
        cannot learn from a handful of examples anyway.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(normalize_answer(a) for a in train_answers)
        kept = [(a, c) for a, c in _most_frequent(counts) if c >= min_count]
        if max_size is not None:
            kept = kept[:max_size]
        if not kept:
            raise ValueError(f"AnswerVocab.build: no answer occurs at least {min_count} times")
        return cls(answers=[a for a, _ in kept], counts=[c for _, c in kept])

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return normalize_answer(answer) in self._index

    def encode(self, answer: str) -> int:
        """Class id of ``answer``, or ``UNKNOWN_ANSWER_ID`` (-100) when it is not in the vocabulary."""
        return self._index.get(normalize_answer(answer), UNKNOWN_ANSWER_ID)

    def decode(self, answer_id: int) -> str:
        """Answer string of a class id (e.g. the argmax of the QA head)."""
        answer_id = int(answer_id)
        if not 0 <= answer_id < len(self.answers):
            raise ValueError(f"answer id {answer_id} is outside the vocabulary [0, {len(self.answers)})")
        return self.answers[answer_id]

    def to_json(self) -> str:
        """JSON text saved beside a checkpoint, so class ids mean the same answers at evaluation."""
        return json.dumps({"answers": self.answers, "counts": self.counts}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AnswerVocab:
        try:
            data = json.loads(text)
            return cls(answers=list(data["answers"]), counts=list(data.get("counts", [])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"not an AnswerVocab JSON (expected {{'answers': [...]}}): {exc}") from exc


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
    global_answer = _most_frequent(Counter(normalize_answer(a) for a in train_answers))[0][0]
    out = qa_accuracy([global_answer] * len(test_answers), test_answers, test_types)
    out["answer"] = global_answer
    if train_types is not None and test_types is not None:
        _check_lengths(train_answers=train_answers, train_types=train_types)
        per_type_counts: dict[str, Counter] = {}
        for a, t in zip(train_answers, train_types, strict=True):
            per_type_counts.setdefault(str(t), Counter())[normalize_answer(a)] += 1
        answers = {t: _most_frequent(c)[0][0] for t, c in per_type_counts.items()}
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
