"""`evl vq ...`: the VQ video tokenizer whose codes are E-ViLM's masked-video-modelling targets."""

from __future__ import annotations

import typer

from evl.cli_common import RESUME, train_and_print

app = typer.Typer(help="The VQ video tokenizer whose codes are E-ViLM's masked-video-modelling targets.",
                  no_args_is_help=True)


@app.command("train")
def vq_train(
    config: str = typer.Argument(..., help="Tokenizer recipe: packaged name (vq-tiny) or YAML file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. teacher=runs/pretrain-tiny/final"),
    resume: bool = RESUME,
) -> None:
    """Train a VQ tokenizer (semantic: a teacher's features; pixel: VQ-VAE); final/ is what MVM loads."""
    from evl.techniques.evilm.vq_train import load_vq_recipe, train_tokenizer

    train_and_print(load_vq_recipe, train_tokenizer, config, overrides, resume)
