"""Compositional negative captions: a rule-based rewriter for any English caption (no model download).

A negative keeps every word of the caption but one fact: what a pooled embedding that reads captions as
bags of words cannot tell apart ("When and why vision-language models behave like bags-of-words",
ICLR 2023). Each kind is one rule over words found in small general-English lexicons below:

* `colour` — one colour word replaced by a colour the caption does not use ("a red ball" → "a blue ball");
* `size`   — one size/state adjective replaced by its antonym ("a big dog" → "a small dog");
* `noun`   — one object noun replaced by a noun of another synonym group of its class (shapes, animals,
  people, vehicles): "ball" never becomes "disc" or "circle", which name the same thing;
* `verb`   — one action word replaced by its antonym ("grows" → "shrinks", "left" → "right", "fades in"
  → "fades out"), or, for actions without one, by a word of another synonym group of its class
  ("spins" → "bounces", never "rotates");
* `swap`   — the attribute words (colour, size) of two different objects exchanged ("a red circle and a
  blue square" → "a blue circle and a red square"): the same words, bound the other way round;
* `order`  — two events exchanged around a temporal connective ("X, then Y" → "Y, then X"; "X before Y",
  "X after Y", "before X, Y", "first, X; next, Y"), a leading phrase ("in this clip, ", "we see that ") kept first.

A rule that finds nothing to change returns None; a rewrite that equals the caption (after lower-casing
and collapsing spaces) is never returned. Words are matched whole and case-insensitively; a replaced
word keeps the original's capitalisation.
"""

from __future__ import annotations

import re

import numpy as np

KINDS: tuple[str, ...] = ("colour", "size", "noun", "verb", "swap", "order")

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                            "white", "grey", "gray", "cyan", "magenta", "violet", "gold", "silver")
SIZE_ANTONYMS: dict[str, str] = {
    "big": "small", "small": "big", "large": "small", "little": "big", "tiny": "huge", "huge": "tiny",
    "tall": "short", "short": "tall", "long": "short", "old": "young", "young": "old", "open": "closed",
    "closed": "open", "full": "empty", "empty": "full", "light": "dark", "dark": "light", "fast": "slow",
    "slow": "fast", "wet": "dry", "dry": "wet", "hot": "cold", "cold": "hot", "thick": "thin", "thin": "thick",
}
#: Object nouns: class → synonym groups (a replacement comes from another group of the same class).
NOUN_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "shape": (("circle", "disc", "disk", "ball", "sphere"), ("square", "box", "cube"), ("triangle", "pyramid"),
              ("cross", "plus"), ("star",), ("rectangle",), ("heart",), ("diamond",), ("ring", "donut"),
              ("hexagon",), ("oval", "ellipse")),
    "animal": (("dog", "puppy"), ("cat", "kitten"), ("horse",), ("bird",), ("cow",), ("sheep",), ("duck",),
               ("fish",), ("rabbit",)),
    "person": (("man", "guy"), ("woman", "lady"), ("boy",), ("girl",), ("child", "kid")),
    "vehicle": (("car",), ("bus",), ("truck", "lorry"), ("bike", "bicycle"), ("train",), ("boat", "ship"),
                ("plane", "airplane")),
}
#: Action words with antonyms, each pair in every form a caption uses (both directions apply).
VERB_ANTONYMS: tuple[tuple[str, str], ...] = (
    ("grows", "shrinks"), ("grow", "shrink"), ("growing", "shrinking"), ("expands", "contracts"),
    ("expand", "contract"), ("expanding", "contracting"), ("bigger", "smaller"), ("larger", "smaller"),
    ("rises", "sinks"), ("rise", "sink"), ("rising", "sinking"), ("appears", "disappears"), ("appear", "disappear"),
    ("appearing", "disappearing"), ("opens", "closes"), ("open", "close"), ("opening", "closing"),
    ("enters", "exits"), ("enter", "exit"), ("entering", "exiting"), ("pushes", "pulls"), ("push", "pull"),
    ("pushing", "pulling"), ("starts", "stops"), ("start", "stop"), ("starting", "stopping"), ("sits", "stands"),
    ("sit", "stand"), ("sitting", "standing"), ("left", "right"), ("leftwards", "rightwards"), ("up", "down"),
    ("upwards", "downwards"), ("fades in", "fades out"), ("fade in", "fade out"), ("fading in", "fading out"),
    ("zooms in", "zooms out"), ("turns on", "turns off"), ("speeds up", "slows down"),
)
#: Actions without an antonym: synonym groups of one class (a replacement comes from another group).
VERB_GROUPS: tuple[tuple[str, ...], ...] = (
    ("rotates", "spins", "turns around", "twirls"), ("bounces", "jumps", "hops", "hops up and down"),
    ("runs", "sprints"), ("walks", "strolls"), ("swims",), ("flies",), ("falls", "drops"),
)
ORDER_CONNECTIVES: tuple[str, ...] = (", and then ", ", then ", "; after that, ", "; next, ", " and afterwards ",
                                      " and then ", " then ")

_WORD = re.compile(r"[A-Za-z]+")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _find(text: str, phrase: str) -> list[re.Match]:
    """Whole-word, case-insensitive occurrences of `phrase` (one or more words)."""
    return list(re.finditer(r"(?<![A-Za-z])" + re.escape(phrase).replace(r"\ ", r"\s+") + r"(?![A-Za-z])", text,
                            flags=re.IGNORECASE))


def _replace_at(text: str, m: re.Match, new: str) -> str:
    """`new` in place of the match; an "a"/"an" just before it follows the new word ("an orange")."""
    head = text[:m.start()]
    article = re.search(r"(?<![A-Za-z])(a|an)(\s+)$", head, flags=re.IGNORECASE)
    if article:
        word = "an" if new[:1].lower() in "aeiou" else "a"
        head = head[:article.start()] + _match_case(word, article.group(1)) + article.group(2)
    return head + _match_case(new, m.group(0)) + text[m.end():]


def _change_word(text: str, choices: dict[str, list[str]], rng: np.random.Generator) -> str | None:
    """Replace one occurrence of a key of `choices` (longest phrases first, no overlaps) by one of its values."""
    found: list[tuple[re.Match, str]] = []
    taken: list[tuple[int, int]] = []
    for phrase in sorted(choices, key=lambda p: -len(p)):
        for m in _find(text, phrase):
            if all(m.end() <= a or m.start() >= b for a, b in taken):
                found.append((m, phrase))
                taken.append((m.start(), m.end()))
    if not found:
        return None
    m, phrase = found[int(rng.integers(len(found)))]
    options = choices[phrase]
    return _replace_at(text, m, options[int(rng.integers(len(options)))])


def _colour(text: str, rng: np.random.Generator) -> str | None:
    used = {w.lower() for w in _WORD.findall(text)}
    unused = [c for c in COLOURS if c not in used and not (c in ("grey", "gray") and used & {"grey", "gray"})]
    return _change_word(text, {c: unused for c in COLOURS if c in used}, rng) if unused else None


def _groups_choices(groups: tuple[tuple[str, ...], ...]) -> dict[str, list[str]]:
    """word → the first word of every other group (the plain form)."""
    return {w: [g[0] for g in groups if g is not group] for group in groups for w in group}


_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "fish": "fish", "sheep": "sheep",
                      "guy": "guys", "lady": "ladies", "kid": "kids"}


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _noun(text: str, rng: np.random.Generator) -> str | None:
    choices: dict[str, list[str]] = {}
    for groups in NOUN_GROUPS.values():
        singular = _groups_choices(groups)
        choices.update(singular)
        choices.update({_plural(w): [_plural(o) for o in opts] for w, opts in singular.items() if _plural(w) != w})
    return _change_word(text, choices, rng)


def _verb(text: str, rng: np.random.Generator) -> str | None:
    choices: dict[str, list[str]] = {}
    for a, b in VERB_ANTONYMS:
        choices.setdefault(a, []).append(b)
        choices.setdefault(b, []).append(a)
    choices.update(_groups_choices(VERB_GROUPS))
    if _find(text, "up and down"):   # "hops up and down" is one action: its "up"/"down" are not directions
        choices.pop("up", None)
        choices.pop("down", None)
    return _change_word(text, choices, rng)


def _swap(text: str, rng: np.random.Generator) -> str | None:
    """Exchange the attribute words of two objects: two attribute words that differ and are not adjacent
    (adjacent ones describe one object: "a big red ball")."""
    attrs = set(COLOURS) | set(SIZE_ANTONYMS)
    words = [m for m in _WORD.finditer(text) if m.group(0).lower() in attrs]
    pairs = [(a, b) for i, a in enumerate(words) for b in words[i + 1:]
             if a.group(0).lower() != b.group(0).lower() and text[a.end():b.start()].strip(" ,") != ""]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    second = _replace_at(text, b, a.group(0).lower())   # the later one first: the earlier offsets stay valid
    return _replace_at(second, a, b.group(0).lower())


def _split_lead(clause: str) -> tuple[str, str]:
    """("in this clip, ", "a red circle moves") — a leading phrase that ends in a comma, or a framing clause
    that ends in "that"/"where"/"how" ("we see that ", "a video where "), stays in front."""
    if ", " in clause:
        lead, rest = clause.rsplit(", ", 1)
        return lead + ", ", rest
    m = re.match(r"^(.*?\b(?:that|where|how)\s+)(.+)$", clause, flags=re.IGNORECASE)
    return (m.group(1), m.group(2)) if m else ("", clause)


def _order(text: str, rng: np.random.Generator) -> str | None:
    low = text.lower()
    m = re.match(r"^((?:[^,]*, )?)((?:before|after) )([^,]+), ([^,]+)$", text, flags=re.IGNORECASE)
    if m:   # "[lead, ]before Y, X" → "[lead, ]before X, Y"
        return f"{m.group(1)}{m.group(2)}{m.group(4)}, {m.group(3)}"
    for conn in ORDER_CONNECTIVES:
        parts = re.split(re.escape(conn), text, flags=re.IGNORECASE)
        if len(parts) >= 2:
            seps = re.findall(re.escape(conn), text, flags=re.IGNORECASE)
            i = int(rng.integers(len(parts) - 1))
            lead, first = _split_lead(parts[i]) if i == 0 else ("", parts[i])
            head = re.match(r"^(first,?\s+)(.*)$", first, flags=re.IGNORECASE)
            opener = ""
            if head:
                opener, first = head.group(1), head.group(2)
            parts = list(parts)
            parts[i], parts[i + 1] = lead + opener + parts[i + 1], first
            out = parts[0]
            for sep, part in zip(seps, parts[1:], strict=True):
                out += sep + part
            return out
    for word in (" before ", " after "):
        if low.count(word) == 1 and not low.startswith(word.strip()):   # "X before Y" → "Y before X"
            i = low.index(word)
            lead, first = _split_lead(text[:i])
            return f"{lead}{text[i + len(word):]}{text[i:i + len(word)]}{first}"
    return None


_RULES = {"colour": _colour, "size": lambda t, r: _change_word(t, {k: [v] for k, v in SIZE_ANTONYMS.items()}, r),
          "noun": _noun, "verb": _verb, "swap": _swap, "order": _order}


def rewrite(caption: str, kind: str, rng: np.random.Generator) -> str | None:
    """One negative of `kind` (see the module doc), or None when the rule finds nothing to change."""
    if kind not in _RULES:
        raise ValueError(f"unknown rewrite kind {kind!r}; one of {', '.join(KINDS)}")
    out = _RULES[kind](caption, rng)
    return out if out is not None and _norm(out) != _norm(caption) else None


def negatives(caption: str, count: int, kinds: tuple[str, ...] | list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Up to `count` distinct negatives of `caption` as (text, kind), the kinds drawn in a random order
    from those that apply; fewer when the caption offers fewer."""
    out: list[tuple[str, str]] = []
    seen = {_norm(caption)}
    for _ in range(4 * count):
        if len(out) == count:
            break
        for kind in [kinds[int(i)] for i in rng.permutation(len(kinds))]:
            text = rewrite(caption, kind, rng)
            if text is not None and _norm(text) not in seen:
                seen.add(_norm(text))
                out.append((text, kind))
                break
    return out


__all__ = ["KINDS", "negatives", "rewrite"]
