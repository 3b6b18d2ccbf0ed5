"""Compositional hard negatives: the rule-based rewriter on hand-written captions, its invariants, and
the two loss terms that use its negatives (batch transform, losses by hand, options, a training step)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from evl.data.rewrite import KINDS, negatives, rewrite

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TWO_EVENTS = "a red circle moves left, then a blue square grows"


def _all(caption: str, kind: str, seeds: int = 40) -> set[str | None]:
    return {rewrite(caption, kind, np.random.default_rng(s)) for s in range(seeds)}


@pytest.mark.parametrize("caption, expected", [
    (TWO_EVENTS, "a blue square grows, then a red circle moves left"),
    ("in this clip, the green star spins; next, a yellow box hops up and down",
     "in this clip, a yellow box hops up and down; next, the green star spins"),
    ("first, a red ball sinks; after that, the cyan cross fades in",
     "first, the cyan cross fades in; after that, a red ball sinks"),
    ("a purple triangle rotates after a red disc shrinks", "a red disc shrinks after a purple triangle rotates"),
    ("the man sits down before the woman opens the door", "the woman opens the door before the man sits down"),
    ("before the blue star bounces, a red square appears", "before a red square appears, the blue star bounces"),
    ("we see that a dog barks and then a cat runs", "we see that a cat runs and then a dog barks"),
])
def test_order_exchanges_two_events_and_keeps_the_lead(caption, expected):
    assert _all(caption, "order") == {expected}


@pytest.mark.parametrize("caption, expected", [
    (TWO_EVENTS, "a blue circle moves left, then a red square grows"),
    ("a big dog chases a small cat", "a small dog chases a big cat"),
    ("an orange ball hits a red box", "a red ball hits an orange box"),     # articles follow the new word
])
def test_swap_binds_the_same_attributes_the_other_way_round(caption, expected):
    assert _all(caption, "swap") == {expected}


def test_swap_leaves_one_objects_own_adjectives_alone():
    assert _all("a big red ball rolls", "swap") == {None}   # adjacent: one object, swapping changes nothing


@pytest.mark.parametrize("caption, expected", [
    ("a circle grows", {"a circle shrinks"}),
    ("the light fades in", {"the light fades out"}),
    ("a square moves left", {"a square moves right"}),
    ("the door opens", {"the door closes"}),
])
def test_verb_antonyms(caption, expected):
    assert _all(caption, "verb") == expected


def test_verb_without_antonym_goes_to_another_synonym_group_and_up_and_down_is_one_action():
    got = _all("a box hops up and down", "verb", seeds=80)
    assert None not in got and all("hops" not in g and "jumps" not in g and "bounces" not in g for g in got)
    assert "a box rotates" in got
    assert all("spins" not in g and "rotates" not in g for g in _all("a star spins", "verb", seeds=80))


def test_noun_never_becomes_a_synonym():
    got = _all("a ball rolls", "noun", seeds=200)
    assert None not in got
    assert not {g.split()[1] for g in got} & {"ball", "disc", "disk", "circle", "sphere"}
    plurals = {g.split()[1] for g in _all("two dogs play", "noun", seeds=200)}   # plurals stay plural
    assert {"cats", "fish", "sheep"} <= plurals and not plurals & {"dogs", "puppies", "fishs", "sheeps"}
    assert {g.split()[1] for g in _all("three men wait", "noun", seeds=200)} >= {"women", "children"}


def test_colour_takes_an_unused_colour_and_fixes_the_article():
    got = _all("a red apple and a blue cup", "colour", seeds=200)
    for g in got:
        words = g.split()
        assert sum(w in ("red", "blue") for w in words) == 1         # one colour changed, to an unused one
        for article, word in zip(words, words[1:], strict=False):
            if article in ("a", "an"):
                assert article == ("an" if word[0] in "aeiou" else "a"), g


def test_size_antonym_and_case_kept():
    assert _all("A Big dog barks", "size") == {"A Small dog barks"}


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_to_change_is_none(kind):
    assert rewrite("the scene is quiet", kind, np.random.default_rng(0)) is None


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown rewrite kind 'colours'"):
        rewrite(TWO_EVENTS, "colours", np.random.default_rng(0))


def test_negatives_never_equal_the_caption_and_are_distinct_on_synthvl_captions():
    from evl.data.synth_text import Fact, render_caption, sample_style

    rng = np.random.default_rng(0)
    colours, shapes, verbs = ("red", "blue", "green"), ("circle", "square", "star"), ("grow", "shrink", "bounce", "appear")
    for _ in range(300):
        n = int(rng.integers(1, 4))
        facts = [Fact(str(rng.choice(colours)), str(rng.choice(shapes)), str(rng.choice(verbs))) for _ in range(n)]
        caption = render_caption(facts, sample_style(rng, n))
        negs = negatives(caption, 4, KINDS, rng)
        texts = [" ".join(t.lower().split()) for t, _ in negs]
        assert " ".join(caption.lower().split()) not in texts
        assert len(set(texts)) == len(texts) and 1 <= len(negs) <= 4
        for text, kind in negs:
            if kind in ("order", "swap"):   # the same words, bound or ordered otherwise
                words = sorted(re.findall(r"[a-z]+", text.lower()))
                assert words == sorted(re.findall(r"[a-z]+", caption.lower())) or kind == "swap", (caption, text)


def test_negatives_are_drawn_reproducibly():
    a = negatives(TWO_EVENTS, 3, KINDS, np.random.default_rng(7))
    assert a == negatives(TWO_EVENTS, 3, KINDS, np.random.default_rng(7)) and len(a) == 3


# ------------------------------------------------------------------ loss terms


@pytest.fixture
def objective_and_batch(tiny_model_dict_factory):
    from evl.data.datasets import Collator
    from evl.data.text import tokenizer_for
    from evl.models.model import build_model
    from evl.train.objective import TrainObjective

    torch.manual_seed(0)
    model = build_model(tiny_model_dict_factory("encoder", vocab_size=30522))
    tok = tokenizer_for(model.cfg)
    objective = TrainObjective.from_spec(model, {"vtc": 1, "neg_vtc": {"weight": 1, "count": 2},
                                                 "neg_vtm": {"weight": 1, "count": 2}}, tok)
    caps = [TWO_EVENTS, "the green star spins", "the scene is quiet", "a big dog and a small cat"]
    g = torch.Generator().manual_seed(0)
    samples = [{"frames": torch.rand(4, 3, 32, 32, generator=g) * 255, "frame_mask": torch.ones(4, dtype=torch.bool),
                "video_name": f"v{i}", "clip_key": f"v{i}", "index": i, "seed": 100 + i, "verbs": [], "nouns": [],
                "text": c} for i, c in enumerate(caps)]
    batch = Collator(tok, 32, transforms=objective.batch_transforms())(samples)
    return objective, batch, tok


def test_the_batch_transform_writes_k_negatives_per_caption_seeded(objective_and_batch):
    objective, batch, tok = objective_and_batch
    assert batch["negative_ids"].shape[0] == 8
    assert batch["negative_valid"].tolist() == [[True, True], [True, True], [False, False], [True, True]]
    decoded = [tok._tok.decode(x) for x in batch["negative_ids"].tolist()]
    assert decoded[4] == decoded[5] == "the scene is quiet"   # padding rows repeat the caption, marked invalid
    expected = [t for t, _ in negatives(TWO_EVENTS, 2, KINDS, np.random.default_rng([100, 23]))]
    assert decoded[:2] == expected


def test_neg_vtc_equals_the_hand_computed_cross_entropy(objective_and_batch):
    from evl.losses.step import StepCache

    objective, batch, _ = objective_and_batch
    step = StepCache(objective.model, batch, objective._features, list(objective.terms.values()))
    v = torch.nn.functional.normalize(step["video"].emb.detach().float(), dim=-1)
    t = torch.nn.functional.normalize(step["text"].emb.detach().float(), dim=-1)
    n = torch.nn.functional.normalize(step["negative_text"].emb.detach().float(), dim=-1).view(4, 2, -1)
    scale = float(step["logit_scale"].detach())
    losses = []
    for i in range(4):
        logits = [scale * float(v[i] @ t[j]) for j in range(4)]
        logits += [scale * float(v[i] @ n[i, k]) for k in range(2) if batch["negative_valid"][i, k]]
        losses.append(-logits[i] + math.log(sum(math.exp(x) for x in logits)))
    got = objective.terms["neg_vtc"](step)
    assert float(got.detach()) == pytest.approx(sum(losses) / 4, rel=1e-5)


def test_neg_vtm_pairs_each_video_with_its_caption_and_one_negative(objective_and_batch, monkeypatch):
    from evl.losses import compositional
    from evl.losses.step import StepCache

    objective, batch, _ = objective_and_batch
    seen = {}

    def spy(logits, labels):
        seen["labels"] = labels.tolist()
        return logits.sum() * 0

    monkeypatch.setattr(compositional, "vtm_loss", spy)
    step = StepCache(objective.model, batch, objective._features, list(objective.terms.values()))
    objective.terms["neg_vtm"](step)
    assert seen["labels"] == [1, 1, 1, 1, 0, 0, 0]   # caption 2 has no negative


def test_a_training_step_with_both_terms_updates_the_weights(objective_and_batch):
    objective, batch, _ = objective_and_batch
    out = objective(batch)
    assert {"vtc", "neg_vtc", "neg_vtm"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in objective.model.fusion.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)   # neg_vtm reaches the fusion path


@pytest.mark.parametrize("options, message", [
    ({"kinds": ["colours"]}, "kinds must be a non-empty list"), ({"kinds": []}, "kinds must be a non-empty list"),
    ({"count": 0}, "count must be an integer from 1 to 8"), ({"count": 9}, "from 1 to 8"),
    ({"count": True}, "count: expected an integer, got True"), ({"bogus": 1}, "bogus"),
])
def test_bad_options_are_refused_when_the_recipe_loads(tmp_path, options, message):
    from evl.errors import ConfigError
    from evl.recipes import load_recipe

    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = load_recipe("pretrain-tiny-lit", [f"objectives.neg_vtc={ {'weight': 1, **options} }".replace("'", "")])
        from evl.losses.registry import build_terms
        from evl.losses.terms import TermContext

        build_terms(cfg.objectives, TermContext(None, tokenizer=object()))


def test_different_settings_for_the_two_terms_are_an_error(tiny_model_dict_factory):
    from evl.data.datasets import Collator
    from evl.data.text import tokenizer_for
    from evl.models.model import build_model
    from evl.train.objective import TrainObjective

    model = build_model(tiny_model_dict_factory("encoder", vocab_size=30522))
    tok = tokenizer_for(model.cfg)
    objective = TrainObjective.from_spec(model, {"vtc": 1, "neg_vtc": {"count": 1}, "neg_vtm": {"count": 2}}, tok)
    sample = {"frames": torch.zeros(4, 3, 32, 32), "frame_mask": torch.ones(4, dtype=torch.bool), "video_name": "v",
              "clip_key": "v", "index": 0, "seed": 1, "verbs": [], "nouns": [], "text": TWO_EVENTS}
    with pytest.raises(ValueError, match="same kinds and count"):
        Collator(tok, 32, transforms=objective.batch_transforms())([sample])
