"""The tasks a recipe can train and `evl eval` can evaluate, as data: one `TaskSpec` per task.

A task says what text the dataset reads (a caption, the question, nothing), what every annotation
record must carry, which loss terms it trains by default, what it prepares before training (QA: the
answer vocabulary and head) and how it is evaluated. Recipes and the CLI look tasks up in `TASKS`
instead of branching on the task's name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evl.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text: str                                   # what the dataset reads as text: caption | question | none
    needs: str                                  # what every record must carry, in words (for errors)
    has_needed: Callable[[Any], bool]           # record -> whether it carries it
    objectives: dict[str, float]                # default loss terms and weights
    evaluate: Callable[..., dict]               # (model, records, videos, tokenizer, settings, ctx) -> metrics
    uses_answer_vocab: bool = False

    def check_records(self, records: list, path: str) -> None:
        """Fail before any work when the annotation cannot serve the task (e.g. a QA file for retrieval)."""
        bad = next((r for r in records if not self.has_needed(r)), None)
        if bad is not None:
            raise ConfigError(f"{bad.source or path}: task={self.name} needs {self.needs} in every record; "
                              f"this one has none (kind {bad.kind!r}). Use an annotation file of that task or set task=...")


def _eval_retrieval(model, records, videos, tokenizer, settings, ctx) -> dict:
    from evl.tasks.evaluate import evaluate_retrieval

    return evaluate_retrieval(model, records, videos, tokenizer, settings, ctx.get("num_frames"))


def _eval_qa(model, records, videos, tokenizer, settings, ctx) -> dict:
    from evl.tasks.evaluate import evaluate_qa

    if ctx.get("vocab") is None:
        raise ConfigError("QA evaluation needs the answer vocabulary saved beside the checkpoint (answers.json)")
    return evaluate_qa(model, records, videos, tokenizer, ctx["vocab"], settings, ctx.get("train_records"),
                       ctx.get("num_frames"))


def _eval_mc(model, records, videos, tokenizer, settings, ctx) -> dict:
    from evl.tasks.evaluate import evaluate_mc

    return evaluate_mc(model, records, videos, tokenizer, settings, ctx.get("num_frames"))


_CAPTION = dict(text="caption", needs="a caption", has_needed=lambda r: bool(r.captions), evaluate=_eval_retrieval)

TASKS: dict[str, TaskSpec] = {
    "pretrain": TaskSpec("pretrain", objectives={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, **_CAPTION),
    "retrieval": TaskSpec("retrieval", objectives={"vtc": 1.0, "vtm": 1.0}, **_CAPTION),
    "qa": TaskSpec("qa", text="question", needs="a question and an answer",
                   has_needed=lambda r: bool(r.question) and r.answer is not None,
                   objectives={"qa": 1.0}, evaluate=_eval_qa, uses_answer_vocab=True),
    "mc": TaskSpec("mc", text="none", needs="answer options", has_needed=lambda r: bool(r.options) and r.answer_index is not None,
                   objectives={"mc": 1.0}, evaluate=_eval_mc),
}


def get_task(name: str) -> TaskSpec:
    """The task named `name`; an unknown name is an error naming the nearest valid one."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1)
        raise ConfigError(f"unknown task {name!r}; {'did you mean ' + repr(close[0]) + '? ' if close else ''}"
                          f"tasks: {', '.join(TASKS)}")
    return TASKS[name]

