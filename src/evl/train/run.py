"""The one run function every trainable thing goes through: `run_job`.

A recipe kind (the video-language recipes in `evl.recipes`, E-ViLM's VQ tokenizer, VLAP's frame-QA
model) says only what is its own — it builds a `Job`: the objective to train, its data, what to record in
the Trainer's checkpoints, how to write `final/` and how to evaluate it. `run_job` does the rest, the same
for all: the process group under torchrun, the Trainer (one `loss_fn` for every objective), the summary
(steps, losses, time, skipped samples, precision), `final/` written whole or not at all by rank 0 alone,
the evaluation, `summary.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from evl.checkpoint import staged_dir
from evl.train.config import TrainConfig
from evl.train.dist import DistContext, init_distributed
from evl.train.objective import run_objective
from evl.train.state import FINAL_DIR, SUMMARY_FILE
from evl.train.trainer import Callback, Trainer, TrainResult


@dataclass
class Job:
    """What a recipe kind hands `run_job`.

    `summary`: the kind's own summary entries, first in `summary.json` (e.g. the task and its terms).
    `finish(result, summary)`: rank 0, after training and before `save` (e.g. measure codebook usage).
    `save(folder, result, summary)`: write the final model into `folder` (staged: it becomes `final/`
    only when complete). `evaluate()`: rank 0, after saving → `summary["test"]`."""

    objective: nn.Module
    dataset: Dataset
    collate: Callable
    model_config: dict[str, Any]
    save: Callable[[Path, TrainResult, dict], None]
    summary: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[TrainResult, dict], None] | None = None
    evaluate: Callable[[], dict] | None = None
    callbacks: list[Callback] = field(default_factory=list)


def run_job(train: TrainConfig, build: Callable[[DistContext], Job], resume: bool = False) -> dict[str, Any]:
    """Open the process group (torchrun) or a single process, `build` the job, train it, and on rank 0
    save `out_dir/final`, evaluate and write `out_dir/summary.json`. Returns the summary."""
    ctx = init_distributed(train.device)
    try:
        job = build(ctx)
        trainer = Trainer(job.objective, run_objective, job.dataset, train, collate_fn=job.collate,
                          model_config=job.model_config, callbacks=job.callbacks if ctx.is_main else None)
        result = trainer.fit(resume=resume)
        summary = {**job.summary, "steps": result.steps, "final_losses": result.final_losses,
                   "train_time_s": result.wall_time_s, "skipped_samples": result.skipped_samples,
                   "nonfinite_steps": result.nonfinite_steps, "precision": trainer.precision.name,
                   "precision_reason": trainer.precision.reason}
        if not ctx.is_main:
            return summary
        if job.finish is not None:
            job.finish(result, summary)
        out_dir = Path(train.out_dir)
        final = out_dir / FINAL_DIR
        with staged_dir(final) as staged:   # final/ appears whole or not at all
            job.save(staged, result, summary)
        summary["checkpoint"] = str(final)
        if job.evaluate is not None:
            summary["test"] = job.evaluate()
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        ctx.close()
