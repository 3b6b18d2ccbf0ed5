"""The `evl` command. Each sub-command is a thin wrapper: parse options, call the library, print.

Library modules are imported inside the commands, so `evl --help` does not load torch or FFmpeg.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from evl.errors import EvlError

app = typer.Typer(help="evl: efficient video-language models — synthesise data, pre-train, fine-tune, evaluate, benchmark.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect and check annotation files and videos.", no_args_is_help=True)
bench_app = typer.Typer(help="Efficiency reports: parameters, GFLOPs, latency, throughput.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write videos/ and annotations/ into."),
    clips: int = typer.Option(200, "--clips", help="Number of clips to generate."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical files."),
    frames: int = typer.Option(16, "--frames", help="Frames per clip (T)."),
    size: int = typer.Option(64, "--size", help="Frame side in pixels (S×S, even)."),
) -> None:
    """Generate the SynthVL benchmark: mp4 clips plus retrieval/QA/multiple-choice annotations."""
    from evl.data.synthetic import write_synthvl

    try:
        summary = write_synthvl(out_dir, clips=clips, seed=seed, frames=frames, size=size)
    except (EvlError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps(summary, indent=2))


@data_app.command("check")
def data_check(
    annotation: Path = typer.Argument(..., help="Annotation file (json/csv/tsv)."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder the video paths are relative to (default: guessed)."),
    fmt: str | None = typer.Option(None, "--format", help="Annotation format (default: detected). See `evl data formats`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parse an annotation file, check every referenced video exists and decodes, print a summary."""
    from evl.data.check import check_annotations, format_summary

    try:
        summary = check_annotations(annotation, videos_dir=videos, fmt=fmt)
    except EvlError as e:
        _fail(e)
    typer.echo(json.dumps(summary) if as_json else format_summary(summary))


@data_app.command("formats")
def data_formats() -> None:
    """List the annotation formats evl reads."""
    from evl.data.annotations import FORMATS

    for name, reader in FORMATS.items():
        typer.echo(f"{name:14s} {(reader.__doc__ or '').strip().splitlines()[0]}")


@bench_app.command("model")
def bench_model(
    config: str = typer.Argument(..., help="Model config: a packaged name (tiny, small, base, tiny-backbone) or a YAML file."),
    frames: int | None = typer.Option(None, "--frames", help="Frames per clip (default: the config's num_frames)."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes for latency/throughput."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per batch size (after 2 warm-up runs); the median is reported."),
    device: str = typer.Option("cpu", "--device", help="Device for latency/throughput (cpu, cuda)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast) for the timed runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters (total/per part), GFLOPs per clip (dual and fusion path), latency and throughput."""
    from evl.config import load_yaml
    from evl.efficiency import efficiency_report, format_report
    from evl.models.model import build_model

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--batch-sizes must list positive integers, got {batch_sizes!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {precision!r}")
        model = build_model(load_yaml(config))
        report = efficiency_report(model, config, frames=frames, batch_sizes=sizes, repeats=repeats,
                                   device=device, precision=precision)
    except (EvlError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps(report.to_dict()) if as_json else format_report(report))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Output folder for data, checkpoints and report."),
    clips: int = typer.Option(300, "--clips", help="SynthVL clips to generate."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """The main job: synthesise SynthVL, train the tiny model, evaluate, print one table."""
    from evl.quickstart import run_quickstart

    try:
        run_quickstart(out=out, clips=clips, seed=seed)
    except EvlError as e:
        _fail(e)


if __name__ == "__main__":
    app()
