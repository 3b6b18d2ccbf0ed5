"""Shared fixtures: tiny random-init model configs (no MiniLM load) and a tiny SynthVL data set."""

from __future__ import annotations

import copy

import pytest


def tiny_model_dict(kind: str = "encoder", vocab_size: int = 100, num_frames: int = 4) -> dict:
    """Plain-dict model config (what a YAML `model:` section holds): a few-thousand-parameter model.

    Text dropout is 0 so that forward passes are deterministic in train mode too.
    """
    return {
        "video": {"image_size": 32, "patch_size": 16, "tubelet_size": 2, "num_frames": num_frames,
                  "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "text": {"pretrained": None, "vocab_size": vocab_size, "hidden_size": 32, "num_layers": 2,
                 "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
                 "dropout": 0.0, "attention_dropout": 0.0},
        "fusion": {"kind": kind, "num_layers": 1, "num_heads": 2},
        "embed_dim": 16,
    }


@pytest.fixture
def tiny_model_config():
    """Factory: `tiny_model_config(kind="encoder"|"backbone"|"none", vocab_size=100, num_frames=4)` → ModelConfig."""
    from evl.config import from_dict
    from evl.models.model import ModelConfig

    def make(kind: str = "encoder", vocab_size: int = 100, num_frames: int = 4) -> ModelConfig:
        return from_dict(ModelConfig, tiny_model_dict(kind, vocab_size, num_frames), where="model")

    return make


@pytest.fixture(scope="session")
def tiny_model_dict_factory():
    """Factory returning a fresh (deep-copied) plain-dict tiny model config."""
    return lambda *a, **k: copy.deepcopy(tiny_model_dict(*a, **k))


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory, tiny_model_dict_factory):
    """An untrained tiny video-language model saved as a checkpoint (what `evl pretrain` writes), seed 0."""
    import torch

    from evl.models.model import build_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "final"
    build_model(tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread, then restore the previous setting.

    Tiny models gain nothing from more threads, and on a shared, busy CPU extra OpenMP threads only
    spin against other processes (measured here: 61 s → 9 s for the model/recipe/CLI tests).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthvl(tmp_path_factory):
    """A 12-clip SynthVL set (8 frames of 32x32) written once per session; returns its folder."""
    from evl.data.synthetic import write_synthvl

    out = tmp_path_factory.mktemp("synthvl")
    write_synthvl(out, clips=12, seed=0, frames=8, size=32)
    return out


HELD_OUT = 0   # the caption of each clip that `trained` leaves out of training


def _captions(synthvl) -> dict[str, list[str]]:
    from pathlib import Path

    from evl.data.annotations import read_annotations

    out: dict[str, list[str]] = {}
    for name in ("pretrain.json", "retrieval_val.json", "retrieval_test.json"):
        for r in read_annotations(synthvl / "annotations" / name):
            out.setdefault(Path(r.video).name, []).extend(c for c in r.captions if c not in out.get(Path(r.video).name, []))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthvl, tiny_model_dict_factory):
    """A tiny model trained (VTC + VTM) on 4 of the 5 captions of each of the 12 clips, so that text finds
    video. Returns (final/, captions): `captions[name][0]` (HELD_OUT) was never trained on — queries use it."""
    import json

    import yaml
    from typer.testing import CliRunner

    from evl.cli import app

    tmp = tmp_path_factory.mktemp("search_model")
    caps = _captions(synthvl)
    trained_on = [{"video": v, "caption": c} for v, cs in caps.items() for i, c in enumerate(cs) if i != HELD_OUT]
    (tmp / "all.json").write_text(json.dumps(trained_on))
    recipe = {"task": "pretrain", "model": tiny_model_dict_factory("encoder", vocab_size=30522, num_frames=4),
              "objectives": {"vtc": 1.0, "vtm": 1.0},
              "data": {"train": str(tmp / "all.json"), "videos": str(synthvl / "videos")},
              "train": {"max_steps": 200, "batch_size": 12, "lr": 2e-3, "warmup_steps": 5, "ckpt_every": 0,
                        "log_every": 40, "out_dir": str(tmp / "run"), "precision": "fp32"}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)   # the same numerics whichever test module asks first
    try:
        result = CliRunner().invoke(app, ["pretrain", str(tmp / "r.yaml"), "--no-eval"])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return tmp / "run" / "final", caps
