"""The `evl` command. Each sub-command is a thin wrapper: parse options, call the library, print.

Library modules are imported inside the commands, so `evl --help` does not load torch or FFmpeg.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from evl.cli_common import RESUME, train_and_print
from evl.cli_common import fail as _fail
from evl.config import MAX_BENCH_BATCH
from evl.data import MAX_FRAMES, MAX_SYNTH_CLIPS, MAX_SYNTH_SIZE
from evl.errors import EvlError
from evl.quickstart import DEFAULT_CLIPS
from evl.techniques.evilm import cli as evilm_cli
from evl.techniques.vlap import cli as vlap_cli

app = typer.Typer(help="evl: efficient video-language models — synthesise data, pre-train, fine-tune, evaluate, benchmark.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect and check annotation files and videos.", no_args_is_help=True)
bench_app = typer.Typer(help="Efficiency reports: parameters, GFLOPs, latency, throughput.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(evilm_cli.app, name="vq")      # each technique's own sub-commands live in its folder
app.add_typer(vlap_cli.app, name="vlap")
app.add_typer(bench_app, name="bench")


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write videos/ and annotations/ into."),
    clips: int = typer.Option(200, "--clips", help=f"Number of clips to generate (1 to {MAX_SYNTH_CLIPS})."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical files."),
    frames: int | None = typer.Option(None, "--frames", help=f"Frames per clip (T, 4 to {MAX_FRAMES}; default 16, "
                                      "48 with --long)."),
    size: int = typer.Option(64, "--size", help=f"Frame side in pixels (S×S, even, 16 to {MAX_SYNTH_SIZE})."),
    long: bool = typer.Option(False, "--long", help="Long clips (24+ frames, 48–64 recommended): 3–5 events with idle "
                              "time between, one-moment captions, event-targeted and order questions."),
) -> None:
    """Generate the SynthVL benchmark: mp4 clips plus retrieval/QA/multiple-choice annotations."""
    from evl.data.synthetic import long_config, write_synthvl

    try:
        default = 48 if long else 16
        cfg = long_config(default if frames is None else frames, size) if long else None
        summary = write_synthvl(out_dir, clips=clips, seed=seed, frames=default if frames is None else frames,
                                size=size, cfg=cfg)
    except (EvlError, ValueError) as e:
        _fail(e)
    except OSError as e:
        _fail(EvlError(f"OUT_DIR {out_dir}: cannot write there ({e.strerror or e}: {e.filename}); choose a folder "
                       "you can write to"))
    typer.echo(json.dumps(summary, indent=2))


@data_app.command("check")
def data_check(
    annotation: Path = typer.Argument(..., help="Annotation file (json/csv/tsv)."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder the video paths are relative to (default: guessed)."),
    fmt: str | None = typer.Option(None, "--format", help="Annotation format (default: detected). See `evl data formats`."),
    split: str | None = typer.Option(None, "--split", metavar="NAME",
                                     help="Check only this split; for formats that carry splits, e.g. "
                                     "MSRVTT_data.json: train, validate, test."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    allow_bad: bool = typer.Option(False, "--allow-bad",
                                   help="Exit 0 even when some videos are missing or undecodable."),
) -> None:
    """Parse an annotation file, check every referenced video exists and decodes, print a summary.

    Exit status: 0 every video is there and decodes; 1 some are missing or undecodable (listed; 0 with
    --allow-bad); 2 the annotation file or an option is unusable."""
    from evl.data.check import check_annotations, format_summary

    try:
        summary = check_annotations(annotation, videos_dir=videos, fmt=fmt, split=split)
    except EvlError as e:
        _fail(e)
    typer.echo(json.dumps(summary) if as_json else format_summary(summary))
    bad = summary["missing"] + summary["undecodable"]
    if bad and not allow_bad:
        typer.secho(f"{bad} of {summary['videos']} videos are missing or undecodable (exit status 1; "
                    "--allow-bad accepts them)", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command("shard")
def shard(
    annotation: Path = typer.Argument(..., help="Annotation file (any format `evl data formats` lists)."),
    out: Path = typer.Option(..., "--out", help="Folder for the shards (000000.tar, ...) and index.json; must hold no shards yet."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder the video paths are relative to (default: guessed)."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", help="Samples per tar shard."),
    frames: int | None = typer.Option(None, "--frames", help=f"Store T pre-decoded uint8 frames per sample (1 to {MAX_FRAMES}; with --size) instead of the video bytes."),
    size: int | None = typer.Option(None, "--size", help="Pre-decoded frames: short side resized to S and centre-cropped (with --frames)."),
    fmt: str | None = typer.Option(None, "--format", help="Annotation format (default: detected)."),
    split: str | None = typer.Option(None, "--split", help="For files that carry splits: the one to write."),
    as_json: bool = typer.Option(False, "--json", help="Print the index as one JSON object."),
) -> None:
    """Write an annotation file and its videos as WebDataset tar shards (+ index.json) for streamed training:
    `data.train=OUT/{000000..N}.tar`. Undecodable videos are left out and listed."""
    from evl.data.shard_write import write_shards

    try:
        index = write_shards(annotation, videos, out, samples_per_shard, frames, size, fmt, split)
    except (EvlError, ValueError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(index))
        return
    last = len(index["shards"]) - 1
    typer.echo(f"{out}: {index['total']} samples in {len(index['shards'])} shards ({index['mode']}); "
               f"train with data.train={out}/{{000000..{last:06d}}}.tar")
    for video, why in sorted(index["skipped"].items()):
        typer.echo(f"  left out {video}: {why}")


@data_app.command("formats")
def data_formats() -> None:
    """List the annotation formats evl reads."""
    from evl.data.annotations import FORMATS

    for name, reader in FORMATS.items():
        typer.echo(f"{name:14s} {(reader.__doc__ or '').strip().splitlines()[0]}")


@bench_app.command("model")
def bench_model(
    config: str = typer.Argument(..., help="Model config: a packaged name (tiny, small, base, tiny-backbone) or a YAML file."),
    frames: int | None = typer.Option(None, "--frames", help=f"Frames per clip, 1 to {MAX_FRAMES} (default: the config's num_frames)."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help=f"Comma-separated batch sizes for latency/throughput (each 1 to {MAX_BENCH_BATCH})."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per batch size, 1 to 1000 (after 2 warm-up runs); the median is reported."),
    device: str = typer.Option("cpu", "--device", help="Device for latency/throughput (cpu, cuda)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast) for the timed runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters (total/per part), GFLOPs per clip (dual and fusion path), latency and throughput."""
    from evl.efficiency import bench_config, format_report

    try:
        report = bench_config(config, frames=frames, batch_sizes=batch_sizes, repeats=repeats, precision=precision,
                              device=device)
    except (EvlError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps(report.to_dict()) if as_json else format_report(report))


def _train(config: str, overrides: list[str], init: str | None, resume: bool, no_eval: bool) -> None:
    from evl.recipes import load_recipe, run_recipe

    # under torchrun, rank 0 speaks for the run
    train_and_print(load_recipe, run_recipe, config, overrides, resume, init=init, evaluate=not no_eval)


@app.command(context_settings={"allow_extra_args": False})
def pretrain(
    config: str = typer.Argument(..., help="Recipe: packaged name (pretrain-tiny) or YAML file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=100 data.train=x.json"),
    resume: bool = RESUME,
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation on data.test after training."),
) -> None:
    """Pre-train with any mix of VTC/EgoNCE/VTM/MLM (weights in the recipe). Works under torchrun."""
    _train(config, overrides or [], None, resume, no_eval)


@app.command()
def finetune(
    config: str = typer.Argument(..., help="Recipe: retrieval-tiny, qa-tiny, mc-tiny or a YAML file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
    init: Path = typer.Option(..., "--init", help="Checkpoint folder to start from (e.g. runs/pretrain-tiny/final)."),
    resume: bool = RESUME,
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation on data.test after training."),
) -> None:
    """Fine-tune a checkpoint for retrieval, open-ended QA or multiple choice (the recipe's task)."""
    if not (init / "config.json").is_file():
        _fail(EvlError(f"--init {init}: not an evl checkpoint folder (no config.json); "
                       "pass e.g. runs/pretrain-tiny/final"))
    _train(config, overrides or [], str(init), resume, no_eval)


@app.command()
def ask(
    video: Path = typer.Argument(..., help="A video file (any container FFmpeg reads)."),
    question: str = typer.Argument(..., help="The question, e.g. \"what colour is the square?\""),
    model: Path = typer.Option(..., "--model", help="A QA checkpoint: final/ of `evl vlap train` (frame QA) or of "
                               "`evl finetune qa-tiny`."),
    top: int = typer.Option(5, "--top", help="How many answers to list (the answer and its alternatives)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer one question about one video: the answer, its score, alternatives, and (frame QA) the frames read."""
    import dataclasses
    import time

    from evl.api import load

    try:
        if top < 1:
            raise EvlError(f"--top {top}: must be >= 1")
        loaded = load(model)
        t0 = time.perf_counter()   # decoding + answering, as before: not the checkpoint's loading
        result = loaded.answer(video, question, top)
        seconds = round(time.perf_counter() - t0, 3)
    except (EvlError, ValueError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({**dataclasses.asdict(result), "seconds": seconds}))
        return
    typer.echo(f"answer: {result.answer}  (score {result.score:.3f})")
    if result.alternatives:
        typer.echo("alternatives: " + ", ".join(f"{a} {s:.3f}" for a, s in result.alternatives))
    if result.frames is not None:
        typer.echo("frames read: " + ", ".join(
            f"#{f['candidate']} (frame {f['source_frame']}" + (f", {f['time_s']:.2f} s)" if f["time_s"] is not None else ")")
            for f in result.frames))


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="evl checkpoint folder (final/ of `evl pretrain` or `evl finetune`)."),
    out: Path = typer.Option(..., "--out", help="Folder for the exported encoders (new or empty, or an earlier export)."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write int8 (dynamically quantised) encoders."),
    frames: int | None = typer.Option(None, "--frames", help="Frames per clip the exported video encoder reads "
                                      "(default: the model's; fewer run proportionally faster)."),
) -> None:
    """Export the dual encoder (video + text) as ONNX, checked against PyTorch; load with evl.load(OUT)."""
    from evl.export import export_onnx

    try:
        if fmt != "onnx":
            raise EvlError(f"--format {fmt!r}: the one export format is 'onnx'")
        info = export_onnx(checkpoint, out, int8=int8, num_frames=frames)
    except ImportError as e:
        _fail(EvlError(f"exporting needs the onnx and onnxruntime packages ({e}); pip install onnx onnxruntime"))
    except (EvlError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps(info, indent=2))


@app.command("index")
def index_videos(
    video_dir: Path = typer.Argument(..., help="Folder of videos (searched recursively; any container FFmpeg reads)."),
    model: Path = typer.Option(..., "--model", help="evl checkpoint folder whose dual encoder embeds the videos, or "
                               "its `evl export` folder."),
    out: Path | None = typer.Option(None, "--out", help="Index folder (default: VIDEO_DIR/.evl-index)."),
    segment: float | None = typer.Option(
        None, "--segment", help="Index overlapping segments of this many seconds (>= 0.5; a video it would cut into "
        "more than 10,000 segments is listed as not indexed)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Clips per forward pass (1-256)."),
    approx_above: int = typer.Option(100_000, "--approx-above", help="Use an approximate (IVF) index above this many items."),
    recall_queries: Path | None = typer.Option(
        None, "--recall-queries", help="Text file, one query per line, to measure an approximate index's recall@10 "
        "(default: packaged generic queries)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Start the index afresh (a damaged one): delete its "
                                 "meta.sqlite and index.faiss in --out, then encode every video."),
    backend: str | None = typer.Option(None, "--backend", help="torch (a checkpoint), onnx or onnx-int8 (an `evl export` "
                                       "folder given as --model); default: what the model folder holds."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Index (or update the index of) a folder of videos: only new or changed files are encoded.

    Safe to kill at any moment: what was committed stays, a re-run goes on, and search never mixes an old
    vector with a new file (README, "What survives a kill")."""
    import dataclasses

    from evl.search.index import build_index

    out = out or video_dir / ".evl-index"
    try:
        with _progress() as bar:
            report = build_index(video_dir, model, out, segment, batch_size, approx_above, progress=bar,
                                 recall_queries=recall_queries, rebuild=rebuild, backend=backend)
    except (EvlError, ValueError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report)))
        return
    typer.echo(f"{out}: {report.items} items ({report.kind}"
               + (f", recall@10 {report.recall_at_10:.3f} vs exact on {report.recall_queries} text queries" if report.recall_at_10 is not None else "") + "); "
               f"{len(report.added)} added, {len(report.updated)} updated, {len(report.removed)} removed, "
               f"{report.unchanged} unchanged, {len(report.failed)} unreadable, {len(report.skipped)} skipped "
               f"({report.seconds:.1f} s)")
    for path, why in sorted({**report.failed, **report.skipped}.items()):
        typer.echo(f"  skipped {path}: {why}")


class _progress:
    """A rich progress bar on stderr while videos are encoded; a callable (done, total, name)."""

    def __enter__(self):
        from rich.progress import Progress

        self.bar = Progress(transient=True, console=None)
        self.bar.start()
        self.task = None
        return self

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.task is None:
            self.task = self.bar.add_task("encoding", total=total)
        self.bar.update(self.task, completed=done, description=name[-40:])

    def __exit__(self, *exc) -> None:
        self.bar.stop()


@app.command()
def search(
    index_dir: Path = typer.Argument(..., help="Index folder written by `evl index`."),
    query: str = typer.Argument(..., help="What the video shows, e.g. \"a red square grows\"."),
    k: int = typer.Option(10, "-k", help="How many results (1-1000)."),
    rerank: int = typer.Option(0, "--rerank", help="Re-score the dual encoder's top K with the fusion model (0 = off; "
                               "at most 1000)."),
    model: Path | None = typer.Option(None, "--model", help="Query model (default: the one that built the index): "
                                      "that checkpoint or its `evl export` folder."),
    backend: str | None = typer.Option(None, "--backend", help="torch (a checkpoint), onnx or onnx-int8 (an `evl export` "
                                       "folder given as --model); default: what the model folder holds."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Search an index with a text query: the best matching videos or segments, with scores."""
    import dataclasses

    from evl.search.query import SearchIndex

    try:
        index = SearchIndex(index_dir, model, backend)
        hits = index.search(query, k, rerank)
    except (EvlError, ValueError) as e:
        _fail(e)
    if not hits and not as_json:
        typer.echo(f"no results: {index_dir} holds {len(index)} items" + (" (index some videos first)" if not len(index) else ""))
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(h) for h in hits]))
        return
    for rank, h in enumerate(hits, 1):
        window = f"  [{h.start:.1f}-{h.end:.1f} s]" if h.start is not None else ""
        typer.echo(f"{rank:3d}. {h.score:.3f}  {h.path}{window}")


@app.command()
def serve(
    index_dir: Path = typer.Argument(..., help="Index folder written by `evl index`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    ask_model: Path | None = typer.Option(None, "--ask-model", help="QA checkpoint that answers questions (`evl vlap "
                                          "train` or `evl finetune qa-tiny`)."),
    backend: str | None = typer.Option(None, "--backend", help="How queries are embedded: torch, onnx or onnx-int8 "
                                       "(default: what the index's model folder holds)."),
) -> None:
    """A web page and JSON API over an index: search, thumbnails, play at the matched time, ask questions."""
    from evl.search.app import serve as run_server

    try:
        if not 0 < port < 65536:
            raise EvlError(f"--port {port}: must be between 1 and 65535")
        if host not in ("127.0.0.1", "localhost", "::1"):
            typer.secho(f"warning: binding to {host}: anyone who can reach this address can search the index "
                        "and stream its videos", fg=typer.colors.YELLOW, err=True)
        run_server(index_dir, host, port, ask_model, backend)
    except (EvlError, ValueError) as e:
        _fail(e)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (model.safetensors + config.json)."),
    task: str = typer.Option(..., "--task", help="retrieval, qa or mc (pretrain = retrieval)."),
    data: Path = typer.Option(..., "--data", help="Annotation file of the evaluation split."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder the video paths are relative to (default: guessed)."),
    fmt: str | None = typer.Option(None, "--format", help="Annotation format (default: detected)."),
    split: str | None = typer.Option(None, "--split", help="For files that carry splits (MSRVTT_data.json): train, validate or test."),
    frames: int | None = typer.Option(None, "--frames", help=f"Frames per clip, 1 to {MAX_FRAMES} (default: the model's)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Clips per forward pass (1-100000)."),
    rerank_k: int = typer.Option(16, "--rerank-k", help="Retrieval: re-rank the dual top-k with the fusion score (0 = off; at most 100000)."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if available), cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the metrics."),
) -> None:
    """Evaluate a checkpoint: retrieval R@1/5/10 + ranks, QA accuracy per type, or MC accuracy."""
    from evl.api import evaluate_folder

    try:
        metrics = evaluate_folder(checkpoint, task, data, videos, fmt=fmt, split=split, frames=frames,
                                  batch_size=batch_size, rerank_k=rerank_k, device=device)
    except (EvlError, ValueError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            typer.echo(f"{k:24s} {v:.2f}" if isinstance(v, float) else f"{k:24s} {v}")


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Output folder for data, checkpoints and report."),
    clips: int = typer.Option(DEFAULT_CLIPS, "--clips", help=f"SynthVL clips to generate (60 to {MAX_SYNTH_CLIPS}): "
                              "70/10/20% train/val/test of the first 500, every further clip for training."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    pretrain_steps: int | None = typer.Option(None, "--pretrain-steps", help="Pre-training steps (default: the recipe's)."),
    retrieval_steps: int | None = typer.Option(None, "--retrieval-steps", help="Retrieval fine-tuning steps."),
    qa_steps: int | None = typer.Option(None, "--qa-steps", help="QA fine-tuning steps."),
    pretrain_recipe: str | None = typer.Option(
        None, "--pretrain-recipe", help="Pre-training recipe (packaged name or YAML; default: the efficiency "
        "sweep's winner; pretrain-tiny is the dense baseline)."),
) -> None:
    """The main job: synthesise SynthVL, pre-train the tiny model, fine-tune + evaluate retrieval/QA/MC, print one table."""
    from evl.quickstart import PRETRAIN_RECIPE, run_quickstart

    try:
        run_quickstart(out=out, clips=clips, seed=seed, pretrain_steps=pretrain_steps,
                       retrieval_steps=retrieval_steps, qa_steps=qa_steps,
                       pretrain_recipe=pretrain_recipe or PRETRAIN_RECIPE)
    except (EvlError, ValueError) as e:
        _fail(e)
    except OSError as e:
        _fail(EvlError(f"--out {out}: cannot write there ({e.strerror or e}: {e.filename}); choose a folder you can "
                       "write to"))


if __name__ == "__main__":
    app()
