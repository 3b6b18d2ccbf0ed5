"""Tokenizer (equal to the HF tokenizer) and MLM masking (statistics, invariants, determinism)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from evl.checkpoint import minilm_path  # noqa: E402
from evl.data.text import MaskedTokens, TextInputError, TokenBatch, Tokenizer, mask_tokens  # noqa: E402

TEXTS = [
    "hello world",
    "A man is playing a guitar on the street.",
    "3 cats, 2 dogs and 1,234.56 apples!!!",
    "café naïve 日本語 😀",
    "tabs\tand\nnewlines",
    "",
    "a very long caption that keeps going " * 20,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained("minilm")


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)
    assert tok.vocab_size == 30522
    assert tok.special_ids == frozenset({0, 100, 101, 102, 103})


@pytest.mark.parametrize("max_length", [8, 32, 256])
def test_ids_equal_hf_tokenizer(tok, max_length):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(minilm_path()))
    expected = ref(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ours = tok(TEXTS, max_length=max_length)
    assert isinstance(ours, TokenBatch)
    assert ours.input_ids.dtype == torch.long
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert torch.equal(ours.attention_mask, expected["attention_mask"])


def test_padding_truncation_and_decode(tok):
    batch = tok(["a dog", "a dog runs on the grass with a ball in its mouth"], max_length=6)
    assert batch.input_ids.shape == (2, 6)
    assert batch.input_ids[1, -1].item() == tok.sep_id  # truncation keeps [SEP]
    assert batch.input_ids[0].tolist() == [tok.cls_id, *batch.input_ids[0, 1:3].tolist(), tok.sep_id, 0, 0]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    short = tok(["a dog", "a cat"], max_length=32)
    assert short.input_ids.shape == (2, 4)  # padded to the longest, not to max_length
    assert tok.decode(short.input_ids[0]) == "a dog"
    assert tok.decode(short.input_ids) == ["a dog", "a cat"]
    assert "[CLS]" in tok.decode(short.input_ids[0].tolist(), skip_special_tokens=False)


@pytest.mark.parametrize(
    ("texts", "match"),
    [([], "non-empty"), ("a text", "wrap a single text"), (["ok", 3], "text #1 is int"), ([None], "text #0")],
)
def test_bad_input_is_rejected(tok, texts, match):
    with pytest.raises(TextInputError, match=match):
        tok(texts)


def test_bad_max_length(tok):
    with pytest.raises(TextInputError, match="max_length"):
        tok(["a"], max_length=1)


# ------------------------------------------------------------------------------------ masking


def random_batch(tok, b=512, n=64, seed=0):
    """Realistic layout: [CLS] regular tokens [SEP] [PAD]..., with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, n + 1, (b,), generator=g)
    ids = torch.randint(1000, tok.vocab_size, (b, n), generator=g)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    ids[:, 0] = tok.cls_id
    ids[torch.arange(b), lengths - 1] = tok.sep_id
    ids[mask == 0] = tok.pad_id
    return ids, mask


def test_mask_statistics_and_labels(tok):
    ids, mask = random_batch(tok)
    out = mask_tokens(ids, mask, tok, prob=0.15, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, MaskedTokens)
    chosen = out.labels != -100
    maskable = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
    assert not (chosen & ~maskable).any()  # never special or pad positions
    frac = chosen.sum().item() / maskable.sum().item()
    assert 0.14 < frac < 0.165  # slightly above 0.15 because every row gets at least one
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    n = chosen.sum().item()
    masked = (out.input_ids[chosen] == tok.mask_id).sum().item() / n
    unchanged = (out.input_ids[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015
    randoms = out.input_ids[chosen & (out.input_ids != tok.mask_id) & (out.input_ids != ids)]
    assert not torch.isin(randoms, torch.tensor(sorted(tok.special_ids))).any()
    assert ((randoms >= 0) & (randoms < tok.vocab_size)).all()


def test_mask_is_deterministic_with_generator(tok):
    ids, mask = random_batch(tok, b=16, n=20)
    a = mask_tokens(ids, mask, tok, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask, tok, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, mask, tok, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_every_maskable_sequence_gets_a_target(tok):
    batch = tok(["a", "dog", "a red ball", ""], max_length=8)
    for seed in range(20):
        out = mask_tokens(batch.input_ids, batch.attention_mask, tok, prob=0.01,
                          generator=torch.Generator().manual_seed(seed))
        per_row = (out.labels != -100).sum(1)
        assert (per_row[:3] >= 1).all()
        assert per_row[3] == 0  # "" is [CLS] [SEP]: nothing maskable, labels all -100


def test_mask_bad_arguments(tok):
    ids, mask = random_batch(tok, b=2, n=5)
    with pytest.raises(TextInputError, match="probability"):
        mask_tokens(ids, mask, tok, prob=0.0)
    with pytest.raises(TextInputError, match=r"\(B, L\)"):
        mask_tokens(ids, mask[:, :3], tok)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 6), n=st.integers(2, 12), seed=st.integers(0, 10_000),
       prob=st.floats(0.01, 0.99))
def test_mask_invariants(tok, b, n, seed, prob):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (b, n), generator=g)  # includes specials 0, 100..103 at random places
    mask = (torch.rand(b, n, generator=g) < 0.8).long()
    out = mask_tokens(ids, mask, tok, prob=prob, generator=g)
    special = torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
    chosen = out.labels != -100
    maskable = mask.bool() & ~special
    assert not (chosen & ~maskable).any()
    assert torch.equal(chosen.any(1), maskable.any(1))
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
