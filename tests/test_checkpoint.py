"""Checkpoint files: model save/load (strict and not), shared tensors, corrupt files, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import evl.checkpoint as ckpt_mod
from evl.checkpoint import (
    atomic_write_json,
    load_model_state,
    load_tensor_tree,
    read_config,
    save_model,
    save_tensor_tree,
)
from evl.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self, width: int = 4, extra: bool = False, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 10, bias=False)
        if tied:
            self.out.weight = self.emb.weight
        if extra:
            self.extra = nn.Linear(width, 2)
        self.register_buffer("scale", torch.tensor([2.0]))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = Tiny()
    save_model(tmp_path / "m", src, {"width": 4, "name": "tiny"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert read_config(tmp_path / "m") == {"width": 4, "name": "tiny"}
    dst = Tiny()
    report = load_model_state(dst, tmp_path / "m")  # a directory works as well as the file
    assert report.ok and len(report.loaded_keys) == len(src.state_dict())
    assert _same(src, dst)


def test_tied_weights_are_saved_and_load_strictly(tmp_path):
    torch.manual_seed(0)
    src = Tiny(tied=True)
    assert src.out.weight.data_ptr() == src.emb.weight.data_ptr()
    save_model(tmp_path, src, {})
    dst = Tiny(tied=True)
    load_model_state(dst, tmp_path / "model.safetensors")
    assert torch.equal(dst.emb.weight, src.emb.weight)
    assert dst.out.weight.data_ptr() == dst.emb.weight.data_ptr()  # still tied after loading


def test_strict_load_lists_missing_unexpected_and_shapes(tmp_path):
    save_model(tmp_path, Tiny(extra=True), {})
    with pytest.raises(CheckpointError) as err:
        load_model_state(Tiny(), tmp_path)
    assert "unexpected" in str(err.value) and "extra.weight" in str(err.value)

    save_model(tmp_path, Tiny(), {})
    with pytest.raises(CheckpointError) as err:
        load_model_state(Tiny(extra=True), tmp_path)
    assert "missing" in str(err.value) and "extra.bias" in str(err.value)

    save_model(tmp_path, Tiny(width=8), {})
    with pytest.raises(CheckpointError) as err:
        load_model_state(Tiny(width=4), tmp_path)
    assert "shape mismatch" in str(err.value) and "proj.weight checkpoint [8, 8] vs model [4, 4]" in str(err.value)


def test_non_strict_load_reports_and_loads_the_rest(tmp_path):
    torch.manual_seed(1)
    src = Tiny(extra=True)
    save_model(tmp_path, src, {})
    dst = Tiny()
    dst.proj = nn.Linear(4, 3)  # shape mismatch on proj.*
    dst.new_head = nn.Linear(4, 1)  # missing in the checkpoint
    report = load_model_state(dst, tmp_path, strict=False)
    assert not report.ok
    assert sorted(report.unexpected_keys) == ["extra.bias", "extra.weight"]
    assert sorted(report.missing_keys) == ["new_head.bias", "new_head.weight"]
    assert {k for k, _, _ in report.mismatched_keys} == {"proj.weight", "proj.bias"}
    assert torch.equal(dst.emb.weight, src.emb.weight)  # the matching tensors were loaded
    assert "new_head.weight" in report.describe()


def test_missing_and_corrupt_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_state(Tiny(), tmp_path / "nope.safetensors")
    save_model(tmp_path, Tiny(), {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model_state(Tiny(), f)
    f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model_state(Tiny(), f)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(tmp_path)


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = Tiny()
    save_model(tmp_path, first, {"v": 1})

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path, Tiny(), {"v": 2})
    monkeypatch.undo()
    dst = Tiny()
    assert load_model_state(dst, tmp_path).ok and _same(first, dst)
    assert read_config(tmp_path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left


def test_atomic_json_never_partial(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setattr(ckpt_mod.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_tensor_tree_roundtrip_of_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model.out(model.proj(model.emb(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    state = opt.state_dict()
    save_tensor_tree(tmp_path, "optimizer", state)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())
    back = load_tensor_tree(tmp_path, "optimizer")
    assert back["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["state"]) == set(state["state"])  # int keys come back as ints
    for idx, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][idx][k], v)
    opt2 = torch.optim.AdamW(Tiny().parameters(), lr=1e-3)
    opt2.load_state_dict(back)
