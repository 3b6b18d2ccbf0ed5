"""`evl vlap ...`: train and evaluate frame-level QA models that read k of N frames."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from evl.cli_common import RESUME, fail, train_and_print
from evl.errors import EvlError

app = typer.Typer(help="VLAP: frame-level video QA reading k of N frames (Frame-Prompter + QFormer-Distiller).",
                  no_args_is_help=True)


@app.command("train")
def vlap_train(
    config: str = typer.Argument(..., help="VLAP recipe: packaged name (vlap-teacher-tiny, vlap-tiny, vlap-teacher-tiny-long, vlap-tiny-long) or YAML file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. model.select=uniform distill=0"),
    resume: bool = RESUME,
) -> None:
    """Train a frame-QA model (the all-frames teacher, or Frame-Prompter + student); final/ is what `evl ask` loads.

    Sizes that allocate are bounded: model.num_candidates and data.num_frames at most 256 frames per clip,
    batch_size_eval >= 1; an out-of-range value is refused when the recipe loads."""
    from evl.techniques.vlap.train import load_vlap_recipe, train_vlap

    train_and_print(load_vlap_recipe, train_vlap, config, overrides, resume)


@app.command("eval")
def vlap_eval(
    checkpoint: Path = typer.Argument(..., help="Frame-QA checkpoint folder (final/ of `evl vlap train`)."),
    data: Path = typer.Option(..., "--data", help="QA annotation file (or multiple-choice with --task mc)."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder the video paths are relative to (default: guessed)."),
    task: str = typer.Option("qa", "--task", help="qa or mc."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the metrics."),
) -> None:
    """Accuracy of a frame-QA checkpoint, overall and per question type, reading the frames it selects."""
    from evl.techniques.vlap.evaluate import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(checkpoint, data, videos, task)
    except (EvlError, ValueError) as e:
        fail(e)
    typer.echo(json.dumps(metrics) if as_json else "\n".join(f"{k:24s} {v}" for k, v in metrics.items()))
