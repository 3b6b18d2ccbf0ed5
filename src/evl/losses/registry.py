"""The one list of loss terms and token operations, core and techniques'.

`TERMS` is the single place that names the available terms: recipes validate their `objectives:`
against it, the Trainer logs each term under its name, and the quickstart plot reads the names from
here. A technique adds its term class to `TERMS` (one line) and nothing else in the house changes.
The loss functions themselves live in `evl.losses.functional`, the core terms in `evl.losses.terms`,
each technique's in its folder under `evl.techniques`. This module is imported by what builds
objectives (`evl.train.objective`, the recipes), never by a term: so a term module can be imported
on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import typing
from collections.abc import Mapping
from typing import Any

from evl.config import from_dict
from evl.errors import ConfigError
from evl.losses.compositional import NegVTCTerm, NegVTMTerm
from evl.losses.terms import LossTerm, MCTerm, MLMTerm, QATerm, TermContext, VTCTerm, VTMTerm
from evl.models.fusion import FUSIONS
from evl.techniques.egovlpv2.egonce import EgoNCETerm
from evl.techniques.evilm.mvm import MVMTerm
from evl.techniques.smaug.mae import VideoMAETerm
from evl.techniques.smaug.sparsify_term import SparsifyTerm

TERMS: dict[str, type[LossTerm]] = {
    cls.name: cls for cls in (VTCTerm, EgoNCETerm, VTMTerm, NegVTCTerm, NegVTMTerm, MLMTerm, QATerm, MCTerm,
                              VideoMAETerm, MVMTerm, SparsifyTerm)
}

__all__ = ["TERMS", "LossTerm", "TermContext", "build_terms", "parse_objectives", "term_names"]


def term_names() -> list[str]:
    """The names a recipe's `objectives:` may use, in the order terms run."""
    return list(TERMS)


def parse_objectives(spec: Mapping[str, Any], where: str = "objectives") -> dict[str, tuple[float, dict]]:
    """`{vtc: 1, mlm: {weight: 1, mask_prob: 0.2}}` → {name: (weight, options)}, terms with weight 0
    dropped, in `TERMS` order. Unknown names and bad weights are errors naming the nearest valid one.

    A token operation (`adds_loss = False`) takes options and no weight: `sparsify: {keep_rate: 0.7}`,
    `sparsify: true` for its defaults, `sparsify: false` (or 0 / null) to switch it off; its weight
    in the result is 0."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping of loss term → weight, got {spec!r}")
    parsed: dict[str, tuple[float, dict]] = {}
    for name, value in spec.items():
        if name not in TERMS:
            close = difflib.get_close_matches(str(name), list(TERMS), n=1, cutoff=0.4)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown loss term {name!r}; {hint}available: {', '.join(TERMS)}")
        if not TERMS[name].adds_loss:
            options = _operation_options(name, value, where)
            if options is not None:
                parsed[name] = (0.0, options)
            continue
        options = dict(value) if isinstance(value, Mapping) else {"weight": value}
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"{where}.{name}: the weight must be a finite number >= 0, got {weight!r}; give a finite "
                              f"weight (e.g. {where}.{name}=1), or 0 to switch the term off")
        if weight > 0:
            parsed[name] = (float(weight), options)
    if not any(TERMS[name].adds_loss for name in parsed):
        losses = [n for n, cls in TERMS.items() if cls.adds_loss]
        raise ConfigError(f"{where}: every loss term has weight 0 (or none is listed): nothing to train; "
                          f"list at least one of {', '.join(losses)} (e.g. {where}: {{vtc: 1}})")
    return {name: parsed[name] for name in TERMS if name in parsed}


def _operation_options(name: str, value: Any, where: str) -> dict | None:
    """Options of a token operation (no loss): a mapping, true (defaults), or false/0/null (off)."""
    if value is None or value is False or (not isinstance(value, bool) and value == 0):
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{name} is a token operation with no loss: give its options as a mapping "
                          f"(e.g. {where}.{name}: {{...}}), true for the defaults or false to switch it off; "
                          f"got {value!r}")
    if "weight" in value:
        raise ConfigError(f"{where}.{name} is a token operation with no loss of its own, so it takes no "
                          f"weight (got weight={value['weight']!r}); drop the weight key")
    return dict(value)


def build_terms(spec: Mapping[str, Any], ctx: TermContext, where: str = "objectives"
                ) -> tuple[dict[str, LossTerm], dict[str, float]]:
    """Instantiate the recipe's terms → ({name: term}, {name: weight}). A term that needs the fusion
    path on a model without one, or an option the term does not take, is an error naming both."""
    parsed = parse_objectives(spec, where)
    ctx.enabled = tuple(parsed)
    ctx.positives = tuple(dict.fromkeys(["clip_positives", *(f for n in parsed for f in TERMS[n].positives)]))
    terms: dict[str, LossTerm] = {}
    for name, (_, options) in parsed.items():
        cls = TERMS[name]
        if cls.needs_fusion and not _has_fusion(ctx.model_cfg):
            raise ConfigError(f"{where}.{name} needs a fusion model; this model has fusion.kind="
                              f"{ctx.model_cfg.fusion.kind!r}. Drop the term or pick a model with fusion "
                              f"(fusion.kind: {' | '.join(k for k, v in FUSIONS.items() if v is not None)}).")
        typed = term_options(cls)
        accepted = [f.name for f in dataclasses.fields(typed)]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"{where}.{name}: unknown option(s) {', '.join(unknown)}; "
                              f"this term takes: weight{''.join(', ' + a for a in accepted)}")
        values = from_dict(typed, options, where=f"{where}.{name}")   # each value coerced to its annotated type
        try:
            terms[name] = cls(ctx, **{key: getattr(values, key) for key in options})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.{name}: {e}") from e
    return terms, {name: w for name, (w, _) in parsed.items() if terms[name].adds_loss}


@functools.cache
def term_options(cls: type[LossTerm]) -> type:
    """A term's options as a typed dataclass (name, annotated type, default), made from its constructor's
    keyword arguments so they are declared once, where the term uses them. `build_terms` reads a recipe's
    options through it with the config coercer (`config.from_dict`): an unknown option or a value of the
    wrong type is an error naming `objectives.<term>.<option>`; the term then checks ranges."""
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "ctx"):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        fields.append((p.name, hints.get(p.name, Any), dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields)


def _has_fusion(model_cfg: Any) -> bool:
    return FUSIONS.get(getattr(getattr(model_cfg, "fusion", None), "kind", None)) is not None
