"""What every `evl` command shares: how an error a user can act on is shown, and how a run's summary is
printed (by rank 0 only under torchrun). Used by `evl.cli` and the techniques' sub-commands."""

from __future__ import annotations

import json
import os

import typer


def fail(err: Exception) -> None:
    """Print `error: ...` to stderr and exit with status 2 (no traceback: the message says what to do)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def print_summary(summary: dict) -> None:
    """A training run's summary as JSON, once (rank 0) when several processes run it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps(summary, indent=2, default=str))
