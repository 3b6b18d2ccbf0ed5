"""Typed dataclass configs: from dicts / YAML files, `key=value` overrides, strict unknown keys.

Every config in evl is a (nested) dataclass. `from_dict` refuses unknown keys and names the nearest
valid one, because a typo in a recipe that is silently ignored costs a whole training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from evl.errors import ConfigError

T = TypeVar("T")

# Upper bounds on the config sizes that allocate memory: a typed value past one (an extra 0, a wrong key) is a
# ConfigError naming the key, never an out-of-memory kill. Widths: hidden/intermediate sizes, embed_dim,
# code_dim, prompter_width; counts: text vocabulary, answer classes, VQ codes; tokens: one clip's video tokens.
MAX_WIDTH = 16_384
MAX_LAYERS = 256
MAX_COUNT = 1_000_000
MAX_POSITIONS = 8_192
MAX_VIDEO_TOKENS = 65_536
MAX_WORKERS = 64
MAX_BENCH_BATCH = 256       # `evl bench model --batch-sizes`: clips of one timed forward pass


def check_range(key: str, value: float, low: float, high: float | None = None, what: str = "") -> None:
    """ConfigError `key=value: must be between low and high` (`>= low` without `high`) unless it is.
    `what` ends the message: what the value is, or what to do."""
    if not isinstance(value, (int, float)) or math.isnan(value) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key}={value}: must be {bound}{what}")


# keys of earlier versions, and where their setting lives now
MOVED_KEYS = {"mlm_prob": "set the MLM masking rate as objectives: {mlm: {weight: 1, mask_prob: 0.15}}"}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 6


def _show(value: Any) -> str:
    """A value as an error message shows it: repr, cut short (a YAML alias can make a list of billions)."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert `value` to the annotated type `typ` (dataclass, Optional, list, tuple, scalars)."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {typ.__name__}, got {_show(value)}")
        return from_dict(typ, value, where=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {_show(value)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        (arg,) = typing.get_args(typ)[:1] or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        args = typing.get_args(typ)
        if len(args) == 2:
            return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{where}: {_show(value)} is not one of {list(allowed)}")
        return value
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return int(value) if isinstance(value, int) else int(f)
    if typ is float:
        if isinstance(value, bool):   # float(True) is 1.0: a switch given where a number is asked is a mistake
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
        if math.isnan(f):
            raise ConfigError(f"{where}: expected a number, got NaN")
        return f
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a dict; unknown keys raise ConfigError with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {_show(key)} ({type(key).__name__}) is not a name; keys are names such as "
                              f"{', '.join(sorted(fields)[:3])}")
        if key not in fields:
            moved = MOVED_KEYS.get(key)
            raise ConfigError(f"{where}: unknown key {_show(key)}"
                              + (f"; it moved: {moved}" if moved else _suggest(key, list(fields))))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML/JSON-safe) view of a dataclass config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "model=small"]` → nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""
        except yaml.constructor.ConstructorError as e:   # a key given twice: not a plain string either
            raise ConfigError(f"override {_show(item)}: {_yaml_problem(e)}") from None
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise ConfigError(f"override {key}=...: the value is nested too deeply") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins. Neither input is modified."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


CONFIG_DIR = Path(__file__).parent / "configs"
# each technique keeps its own configs beside its code: techniques/<name>/configs/<kind>/*.yaml
TECHNIQUE_CONFIG_DIRS = tuple(sorted((Path(__file__).parent / "techniques").glob("*/configs")))
CONFIG_KINDS = {"models": "model config", "recipes": "recipe", "tokenizers": "tokenizer recipe", "vlap": "VLAP recipe"}


def packaged_config_files(kind: str) -> dict[str, Path]:
    """name → file of every packaged config of one kind, from the core folder and the techniques'."""
    files: dict[str, Path] = {}
    for root in (CONFIG_DIR, *TECHNIQUE_CONFIG_DIRS):
        for f in sorted((root / kind).glob("*.yaml")):
            if f.stem in files:
                raise ConfigError(f"packaged {CONFIG_KINDS.get(kind, kind)} {f.stem!r} exists twice: {files[f.stem]} "
                                  f"and {f}; rename one")
            files[f.stem] = f
    return files


def packaged_configs(kind: str) -> list[str]:
    """Names of the packaged configs of one kind ("models", "recipes", "tokenizers" or "vlap")."""
    return sorted(packaged_config_files(kind))


def resolve_config_path(name_or_path: str | Path, kind: str = "recipes") -> Path:
    """A path to a YAML file, or the name of a packaged config of `kind` (`tiny` in configs/models/,
    `pretrain-tiny` in configs/recipes/). A packaged name of the other kind is an error that says so,
    because a model config passed where a recipe is expected fails later with a puzzling unknown key."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config kind must be one of {sorted(CONFIG_KINDS)}, got {kind!r}")
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.stem if p.suffix in (".yaml", ".yml") else p.name
    packaged = packaged_config_files(kind)
    if stem in packaged:
        return packaged[stem]
    names = sorted(packaged)
    for other, label in CONFIG_KINDS.items():
        if other != kind and stem in packaged_config_files(other):
            raise ConfigError(f"{stem!r} is a packaged {label}, not a {CONFIG_KINDS[kind]}; "
                              f"packaged {CONFIG_KINDS[kind]}s: {', '.join(names)}"
                              + (f" (a recipe picks its model with `model: {stem}` or the override model={stem})"
                                 if other == "models" else ""))
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.5)
    raise ConfigError(f"{CONFIG_KINDS[kind]} {str(name_or_path)!r} is neither a file nor a packaged "
                      f"{CONFIG_KINDS[kind]}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                      f"packaged: {', '.join(names)}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor` merges, it is no key of its own
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_show(key)} is given twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark)
                seen[key] = line
            except TypeError:   # unhashable ([a]: b); the base class says so with its position
                break
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a PyYAML error: what is wrong and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


def load_yaml(path: str | Path, kind: str = "recipes", _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; a file may name a `base:` config (same kind) whose keys it overrides."""
    path = resolve_config_path(path, kind)
    if path.resolve() in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: `base:` refers back to itself ({chain}); remove the cycle")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save the YAML as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base: must name one config (a packaged name or a YAML path), got {_show(base)}")
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        data = deep_merge(load_yaml(base_path if base_path.is_file() else base, kind,
                                    (*_seen, path.resolve())), data)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                kind: str = "recipes", expand: Callable[[dict], dict] | None = None,
                whole: tuple[str, ...] = (), where: str = "config") -> T:
    """YAML file (or packaged name of `kind`) + `key=value` overrides → typed config `cls`: the one loader
    of every recipe kind (training recipes, tokenizer recipes, VLAP recipes).

    `expand(data)` runs before *and* after the overrides are merged (so `model: tiny` is expanded to the
    packaged model's mapping that `model.video.num_layers=2` then refines, and `model=small` replaces).
    An override of a key in `whole` (`objectives={vtc: 1}`) replaces the file's value instead of merging
    into it (`objectives.vtm=0` still changes one entry)."""
    data = load_yaml(path, kind) if path is not None else {}
    overrides = list(overrides or [])
    for key in whole:
        if any(o.split("=", 1)[0].strip() == key for o in overrides):
            data.pop(key, None)
    if expand is not None:
        data = expand(data)
    data = deep_merge(data, parse_overrides(overrides))
    if expand is not None:
        data = expand(data)
    return from_dict(cls, data, where=str(path) if path is not None else where)
