"""The answer vocabulary of open-ended QA, and where it is kept beside a checkpoint.

Open-ended video QA (MSRVTT-QA, MSVD-QA, ...) is usually solved as classification over the most
frequent training answers; a test answer outside that vocabulary can never be predicted, which is why
:meth:`AnswerVocab.encode` maps it to ``-100`` (ignored by the loss).

Answers are compared after :func:`normalize_answer` (strip, lower-case, collapse spaces) so that
"Dog " and "dog" are the same answer in the vocabulary and in accuracy.

Every model kind that answers keeps its vocabulary as `answers.json` (`ANSWERS_FILE`) in its checkpoint
folder; a Trainer checkpoint (`checkpoints/step_*`) finds it in its run folder. `find_answer_vocab` /
`read_answer_vocab` are the one way to look it up.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ANSWERS_FILE = "answers.json"
UNKNOWN_ANSWER_ID = -100  # matches the ignore_index of evl.losses.functional.qa_loss


def normalize_answer(answer: str) -> str:
    """Canonical form used everywhere an answer is compared: stripped, lower-case, single spaces."""
    return " ".join(str(answer).lower().split())


def most_frequent(counts: Counter) -> list[tuple[str, int]]:
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
        kept = [(a, c) for a, c in most_frequent(counts) if c >= min_count]
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


def find_answer_vocab(checkpoint: str | Path) -> Path | None:
    """answers.json beside a checkpoint: in the folder itself (`final/`), or in the run folder of a
    Trainer checkpoint (`checkpoints/step_*`)."""
    ckpt = Path(checkpoint)
    for folder in (ckpt, ckpt.parent.parent):
        if (folder / ANSWERS_FILE).is_file():
            return folder / ANSWERS_FILE
    return None


def read_answer_vocab(checkpoint: str | Path) -> AnswerVocab | None:
    """The answer vocabulary of a checkpoint (see `find_answer_vocab`), or None when it has none."""
    path = find_answer_vocab(checkpoint)
    return AnswerVocab.from_json(path.read_text()) if path is not None else None
