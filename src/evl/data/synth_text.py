"""SynthVL text: captions, open-ended questions and multiple-choice options from clip metadata.

All text is generated from the structured metadata (objects, events in time order), so every
caption and answer is true by construction. Variety (synonyms, determiners, prefixes, connectives,
before/after word order) keeps a text model from matching on surface strings alone, while the
answer vocabulary stays small: colours, shapes, verbs, small numbers, yes/no.

A caption is rendered from its events plus a `CaptionStyle` (the template choices). Multiple-choice
negatives reuse the positive's style with one fact changed, so they differ only where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from evl.data.synth_render import COLOURS, SHAPES

VERBS: tuple[str, ...] = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink",
                          "rotate", "appear", "disappear", "bounce")
#: Present-tense phrases per verb; the first one is the plain form.
VERB_PHRASES: dict[str, tuple[str, ...]] = {
    "move_left": ("moves left", "slides to the left", "goes left", "travels leftwards"),
    "move_right": ("moves right", "slides to the right", "goes right", "travels rightwards"),
    "move_up": ("moves up", "rises", "goes up", "slides upwards"),
    "move_down": ("moves down", "sinks", "goes down", "slides downwards"),
    "grow": ("grows", "gets bigger", "expands", "becomes larger"),
    "shrink": ("shrinks", "gets smaller", "contracts", "becomes smaller"),
    "rotate": ("rotates", "spins", "turns around"),
    "appear": ("appears", "shows up", "fades in"),
    "disappear": ("disappears", "vanishes", "fades out"),
    "bounce": ("bounces", "jumps", "hops up and down"),
}
#: The open-QA answer for each verb (base form, also used in "does the … <answer>?" questions).
VERB_ANSWERS: dict[str, str] = {
    "move_left": "move left", "move_right": "move right", "move_up": "move up", "move_down": "move down",
    "grow": "grow", "shrink": "shrink", "rotate": "rotate", "appear": "appear",
    "disappear": "disappear", "bounce": "bounce",
}
#: Opposites make the hardest verb negatives for multiple choice.
VERB_OPPOSITES: dict[str, str] = {
    "move_left": "move_right", "move_right": "move_left", "move_up": "move_down", "move_down": "move_up",
    "grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear",
    "rotate": "bounce", "bounce": "rotate",
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"), "square": ("square", "box"), "triangle": ("triangle",),
    "cross": ("cross", "plus sign"), "star": ("star",),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
PREFIXES: tuple[str, ...] = ("", "in this clip, ", "a video where ", "we see that ", "on a textured background, ")
CONNECTIVES: tuple[tuple[str, str], ...] = ((", then ", ""), (", and then ", ""), ("; next, ", "first, "),
                                            ("; after that, ", ""), (" and afterwards ", ""))

assert set(SHAPE_WORDS) == set(SHAPES)


def valid_verbs(shape: str) -> tuple[str, ...]:
    """Verbs that visibly change `shape` (a rotating circle looks the same, so it cannot rotate)."""
    return tuple(v for v in VERBS if not (v == "rotate" and shape == "circle"))


def answer_vocabulary(max_objects: int) -> list[str]:
    """Every possible open-QA answer, sorted: small on purpose so QA is classification-friendly."""
    words = list(COLOURS) + list(SHAPES) + list(VERB_ANSWERS.values())
    words += list(NUMBER_WORDS[1:max_objects + 1]) + ["yes", "no"]
    return sorted(set(words))


@dataclass(frozen=True)
class Fact:
    """One event as the text sees it: who (colour, shape) did what (verb)."""

    colour: str
    shape: str
    verb: str


@dataclass(frozen=True)
class CaptionStyle:
    """Template choices for one caption, reusable to render a minimally different negative."""

    prefix: int
    connective: int
    reverse: bool  # word order opposite to time order ("… after …", "before …, …")
    article: tuple[int, ...] = field(default=())
    shape_word: tuple[int, ...] = field(default=())
    phrase: tuple[int, ...] = field(default=())


def facts_of(meta: dict) -> list[Fact]:
    """The clip's events in time order, as `Fact`s."""
    return [Fact(e["colour"], e["noun"], e["verb"]) for e in meta["events"]]


def event_phrase(fact: Fact, style: CaptionStyle, k: int) -> str:
    """'a red circle moves left' — with the style's article, shape synonym and verb phrase for slot k."""
    words = SHAPE_WORDS[fact.shape]
    phrases = VERB_PHRASES[fact.verb]
    article = ("a", "the")[style.article[k] % 2]
    return f"{article} {fact.colour} {words[style.shape_word[k] % len(words)]} {phrases[style.phrase[k] % len(phrases)]}"


def render_caption(facts: list[Fact], style: CaptionStyle) -> str:
    """Join event phrases (time order) into one sentence according to `style`."""
    parts = [event_phrase(f, style, k) for k, f in enumerate(facts)]
    if len(parts) == 1:
        body = parts[0]
    elif style.reverse and len(parts) == 2:
        body = (f"{parts[1]} after {parts[0]}" if style.connective % 2 == 0
                else f"before {parts[1]}, {parts[0]}")
    elif style.reverse:
        body = f"after {parts[0]}, {', '.join(parts[1:-1])}, and finally {parts[-1]}"
    else:
        joiner, opener = CONNECTIVES[style.connective]
        body = opener + joiner.join(parts)
    return PREFIXES[style.prefix] + body


def sample_style(rng: np.random.Generator, n_events: int) -> CaptionStyle:
    """Draw template choices for a caption of `n_events` events."""
    return CaptionStyle(
        prefix=int(rng.integers(len(PREFIXES))), connective=int(rng.integers(len(CONNECTIVES))),
        reverse=bool(n_events > 1 and rng.random() < 0.3),
        article=tuple(int(a) for a in rng.integers(0, 2, n_events)),
        shape_word=tuple(int(a) for a in rng.integers(0, 6, n_events)),
        phrase=tuple(int(a) for a in rng.integers(0, 12, n_events)),
    )


def make_captions(meta: dict, count: int, rng: np.random.Generator) -> list[tuple[str, CaptionStyle]]:
    """`count` captions (distinct when possible) describing the clip, each with the style it used."""
    facts = facts_of(meta)
    out: list[tuple[str, CaptionStyle]] = []
    seen: set[str] = set()
    for _ in range(count * 20):
        style = sample_style(rng, len(facts))
        text = render_caption(facts, style)
        if text not in seen:
            seen.add(text)
            out.append((text, style))
        if len(out) == count:
            break
    while len(out) < count:  # tiny vocabularies only: repeat rather than fail
        out.append(out[len(out) % max(len(seen), 1)])
    return out


def make_moment_captions(meta: dict, count: int, rng: np.random.Generator) -> list[tuple[str, list[int]]]:
    """Long clips: `count` captions that each tell one moment — event k (cycling through the events),
    half of them anchored to the event before it ("… right after …") — with that event's frame
    window [start, end)."""
    facts, events = facts_of(meta), meta["events"]
    out = []
    for j in range(count):
        k = j % len(facts)
        style = sample_style(rng, 2)
        text = event_phrase(facts[k], style, 0)
        if k > 0 and rng.random() < 0.5:
            anchor = event_phrase(facts[k - 1], style, 1)
            text = f"{text} right after {anchor}" if style.connective % 2 else f"right after {anchor}, {text}"
        out.append((PREFIXES[style.prefix] + text, [events[k]["start"], events[k]["end"]]))
    return out


# ----------------------------------------------------------------------------- multiple choice


def _perturb(facts: list[Fact], kind: str, rng: np.random.Generator) -> list[Fact] | None:
    """One fact changed (`colour`, `shape`, `verb`) or the event order changed (`order`); None if impossible."""
    facts = list(facts)
    k = int(rng.integers(len(facts)))
    used_colours = {f.colour for f in facts}
    used_shapes = {f.shape for f in facts}
    if kind == "colour":
        options = [c for c in COLOURS if c not in used_colours]
        facts[k] = replace(facts[k], colour=options[int(rng.integers(len(options)))])
    elif kind == "shape":
        options = [s for s in SHAPES if s not in used_shapes and facts[k].verb in valid_verbs(s)]
        if not options:
            return None
        facts[k] = replace(facts[k], shape=options[int(rng.integers(len(options)))])
    elif kind == "verb":
        opposite = VERB_OPPOSITES[facts[k].verb]
        options = [v for v in valid_verbs(facts[k].shape) if v != facts[k].verb]
        verb = opposite if opposite in options and rng.random() < 0.5 else options[int(rng.integers(len(options)))]
        facts[k] = replace(facts[k], verb=verb)
    elif kind == "order":
        if len(facts) < 2:
            return None
        perm = list(rng.permutation(len(facts)))
        if perm == sorted(perm):
            perm = perm[1:] + perm[:1]
        facts = [facts[int(i)] for i in perm]
    return facts


def make_multiple_choice(meta: dict, captions: list[tuple[str, CaptionStyle]], options: int,
                         rng: np.random.Generator) -> dict:
    """Options = one true caption + hard negatives (one attribute or the event order changed).

    Returns {"caption": [...], "answer": index, "negative_types": [...]}; the answer position is random.
    """
    facts = facts_of(meta)
    text, style = captions[int(rng.integers(len(captions)))]
    kinds = ["colour", "shape", "verb"] + (["order", "order"] if len(facts) > 1 else [])
    negatives: list[tuple[str, str]] = []
    seen = {text}
    for _ in range(200):
        kind = kinds[int(rng.integers(len(kinds)))]
        changed = _perturb(facts, kind, rng)
        if changed is None or changed == facts:
            continue
        neg = render_caption(changed, style)
        if neg not in seen:
            seen.add(neg)
            negatives.append((neg, kind))
        if len(negatives) == options - 1:
            break
    answer = int(rng.integers(options))
    texts = [n for n, _ in negatives]
    texts.insert(answer, text)
    kinds_out = [k for _, k in negatives]
    kinds_out.insert(answer, "positive")
    return {"caption": texts, "answer": answer, "negative_types": kinds_out}


# ----------------------------------------------------------------------------- open-ended QA


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _noun(fact: Fact, rng: np.random.Generator) -> str:
    return f"{fact.colour} {_pick(rng, SHAPE_WORDS[fact.shape])}"


def make_questions(meta: dict, rng: np.random.Generator, long: bool = False) -> list[dict]:
    """Open-ended QA records (question, answer, type, subtype) for one clip.

    Types: attribute (colour/shape), action, count, temporal (after/before/first/last; only with
    ≥ 2 events), existence (exactly one yes and one no per clip, so yes/no is balanced).
    Colours and shapes are unique within a clip, so every question has exactly one answer.
    `long` (long clips) adds event-targeted and order questions (`long_questions`).
    """
    facts = facts_of(meta)
    qa: list[dict] = []

    def add(question: str, answer: str, qtype: str, subtype: str) -> None:
        qa.append({"question": question, "answer": answer, "type": qtype, "subtype": subtype})

    f = _pick(rng, facts)
    add(_pick(rng, ("what colour is the {s}?", "what is the colour of the {s}?", "which colour does the {s} have?")
              ).format(s=_pick(rng, SHAPE_WORDS[f.shape])), f.colour, "attribute", "colour")
    f = _pick(rng, facts)
    add(_pick(rng, ("what shape is the {c} object?", "what is the shape of the {c} object?",
                    "which shape is {c}?")).format(c=f.colour), f.shape, "attribute", "shape")
    f = _pick(rng, facts)
    add(_pick(rng, ("what does the {n} do?", "what happens to the {n}?", "what is the {n} doing?")
              ).format(n=_noun(f, rng)), VERB_ANSWERS[f.verb], "action", "verb")
    add(_pick(rng, ("how many objects are there?", "how many shapes are in the video?",
                    "how many objects can be seen?")), NUMBER_WORDS[len(facts)], "count", "objects")
    if len(facts) > 1:
        qa.append(_temporal_question(facts, rng))
    qa.extend(_existence_questions(facts, rng))
    if long and len(facts) > 1:
        qa.extend(long_questions(meta, rng))
    return qa


def _phrase(fact: Fact, rng: np.random.Generator) -> str:
    return _pick(rng, VERB_PHRASES[fact.verb])


def long_questions(meta: dict, rng: np.random.Generator) -> list[dict]:
    """Questions whose answer lives in one or two moments of a long clip, each with `moments`: the
    [start, end) frame windows a reader must see (the anchor event and the asked one).

    event/colour_after  "what colour is the shape that moves left right after the triangle bounces?"
    event/shape_before  "what shape grows just before the red object spins?"  (the neighbouring event:
                        "right after" / "just before" keep the answer unique when two objects share a verb)
    order/before|after  "does the red circle move left before the blue square grows?" (yes and no equally)
    """
    facts, events = facts_of(meta), meta["events"]

    def win(k: int) -> list[int]:
        return [events[k]["start"], events[k]["end"]]

    out = []
    k = int(rng.integers(len(facts) - 1))
    anchor, target = facts[k], facts[k + 1]
    # "right after" / "just before": the neighbouring event, so a verb another object shares is no second answer
    lead = _pick(rng, ("what colour is the shape that {v} right after the {a} {av}?",
                       "right after the {a} {av}, which colour is the object that {v}?"))
    out.append({"question": lead.format(v=_phrase(target, rng), a=_pick(rng, SHAPE_WORDS[anchor.shape]),
                                        av=_phrase(anchor, rng)),
                "answer": target.colour, "type": "event", "subtype": "colour_after", "moments": [win(k), win(k + 1)]})
    k = int(rng.integers(1, len(facts)))
    anchor, target = facts[k], facts[k - 1]
    out.append({"question": f"what shape {_phrase(target, rng)} just before the {anchor.colour} object {_phrase(anchor, rng)}?",
                "answer": target.shape, "type": "event", "subtype": "shape_before", "moments": [win(k - 1), win(k)]})
    i, j = sorted(int(x) for x in rng.choice(len(facts), size=2, replace=False))
    word = _pick(rng, ("before", "after"))
    truth = rng.random() < 0.5   # ask the true order or the swapped one
    first, second = (i, j) if (word == "before") == truth else (j, i)
    a, b = facts[first], facts[second]
    out.append({"question": f"does the {_noun(a, rng)} {VERB_ANSWERS[a.verb]} {word} the {_noun(b, rng)} "
                            f"{_phrase(b, rng)}?",
                "answer": "yes" if truth else "no", "type": "order", "subtype": word, "moments": [win(i), win(j)]})
    return out


def _temporal_question(facts: list[Fact], rng: np.random.Generator) -> dict:
    """A question whose answer depends on event order, not on which events occur."""
    kind = _pick(rng, ("after", "before", "first", "last"))
    if kind in ("after", "before"):
        k = int(rng.integers(len(facts) - 1)) + (1 if kind == "before" else 0)
        other = facts[k + 1] if kind == "after" else facts[k - 1]
        f = facts[k]
        question = f"what happens {kind} the {_noun(f, rng)} {_pick(rng, VERB_PHRASES[f.verb])}?"
        return {"question": question, "answer": VERB_ANSWERS[other.verb], "type": "temporal", "subtype": kind}
    f = facts[0] if kind == "first" else facts[-1]
    question = _pick(rng, ("what colour is the object that acts {k}?", "what colour is the {k} object to change?")).format(k=kind)
    return {"question": question, "answer": f.colour, "type": "temporal", "subtype": kind}


def _existence_questions(facts: list[Fact], rng: np.random.Generator) -> list[dict]:
    """One true and one false yes/no question, about an object or about an action."""
    out = []
    f = _pick(rng, facts)
    if rng.random() < 0.5:  # object existence
        out.append({"question": f"is there a {_noun(f, rng)}?", "answer": "yes", "type": "existence",
                    "subtype": "object"})
        present = {(x.colour, x.shape) for x in facts}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = _pick(rng, absent)
        out.append({"question": f"is there a {c} {_pick(rng, SHAPE_WORDS[s])}?", "answer": "no",
                    "type": "existence", "subtype": "object"})
    else:  # action existence
        out.append({"question": f"does the {_noun(f, rng)} {VERB_ANSWERS[f.verb]}?", "answer": "yes",
                    "type": "existence", "subtype": "action"})
        g = _pick(rng, facts)
        wrong = [v for v in valid_verbs(g.shape) if v != g.verb]
        out.append({"question": f"does the {_noun(g, rng)} {VERB_ANSWERS[_pick(rng, wrong)]}?", "answer": "no",
                    "type": "existence", "subtype": "action"})
    order = rng.permutation(2)
    return [out[int(i)] for i in order]
