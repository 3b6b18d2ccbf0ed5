"""What every `evl` command shares: how an error a user can act on is shown, and how a run's summary is
printed (by rank 0 only under torchrun). Used by `evl.cli` and the techniques' sub-commands."""

from __future__ import annotations

import json
import os

import typer

from evl.errors import EvlError

# the option every training command takes
RESUME = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.out_dir.")


def fail(err: Exception) -> None:
    """Print `error: ...` to stderr and exit with status 2 (no traceback: the message says what to do)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def print_summary(summary: dict) -> None:
    """A training run's summary as JSON, once (rank 0) when several processes run it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps(summary, indent=2, default=str))


def train_and_print(load, train, config: str, overrides: list[str] | None, resume: bool, **kwargs) -> None:
    """`train(load(config, overrides), resume=resume, **kwargs)` with errors shown as `fail` shows them and
    the summary printed once: the body of every training command."""
    try:
        summary = train(load(config, overrides or []), resume=resume, **kwargs)
    except (EvlError, ValueError) as e:
        fail(e)
    print_summary(summary)
