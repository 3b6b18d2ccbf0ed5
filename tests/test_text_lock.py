"""The locked text tower (LiT; `text.locked_layers`): not trained, no dropout, and its cached outputs are
the outputs of running it."""

from __future__ import annotations

import copy

import pytest
import torch

from evl.errors import ConfigError
from evl.models.text import RowCache, TextEncoder, TextEncoderConfig


def _cfg(**kw) -> TextEncoderConfig:
    base = dict(pretrained=None, vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
                max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    return TextEncoderConfig(**{**base, **kw})


def _batch(seed: int = 0, rows: int = 4, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    ids[0, 4:] = 0
    return ids, mask


def test_cached_locked_tower_gives_the_outputs_of_running_it():
    torch.manual_seed(0)
    locked = TextEncoder(_cfg(locked_layers=2))
    plain = TextEncoder(_cfg())
    plain.load_state_dict(locked.state_dict())
    locked.train()
    plain.train()
    ids, mask = _batch()
    first = locked(ids, mask).tokens                         # computed, then cached
    cache = locked._locked_cache
    assert (cache.misses, cache.hits, len(cache.rows)) == (4, 0, 4)
    again = locked(ids, mask).tokens                         # read from the cache
    assert (cache.misses, cache.hits) == (4, 4)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, plain(ids, mask).tokens, rtol=0, atol=1e-6)
    # a batch mixing seen and new rows, in another order: each row as running the tower on it alone
    new_ids, new_mask = _batch(seed=1, rows=3)
    mixed_ids, mixed_mask = torch.cat([new_ids[:2], ids[2:], ids[:1]]), torch.cat([new_mask[:2], mask[2:], mask[:1]])
    out = locked(mixed_ids, mixed_mask).tokens
    assert cache.hits == 4 + 3 and cache.misses == 4 + 2
    for i in range(len(mixed_ids)):
        torch.testing.assert_close(out[i], plain(mixed_ids[i:i + 1], mixed_mask[i:i + 1]).tokens[0], rtol=0, atol=1e-6)


def test_locked_part_is_not_trained_and_runs_without_dropout():
    torch.manual_seed(0)
    enc = TextEncoder(_cfg(locked_layers=2, dropout=0.5, attention_dropout=0.5, locked_cache=0))
    names = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert names and all(n.startswith(("embeddings.", "layers.0.", "layers.1.")) for n in names)
    assert all(p.requires_grad for n, p in enc.named_parameters() if n.startswith("layers.2."))
    enc.train()
    assert not enc.embeddings.training and not enc.layers[1].training and enc.layers[2].training
    ids, mask = _batch()
    x1, first = enc.unlocked_input(ids, mask)
    x2, _ = enc.unlocked_input(ids, mask)
    assert first == 2 and torch.equal(x1, x2) and not x1.requires_grad   # no dropout, no graph
    enc(ids, mask).mean.sum().backward()
    assert all(p.grad is None for n, p in enc.named_parameters() if n in names)
    assert all(p.grad is not None for n, p in enc.named_parameters() if n.startswith("layers.2.") and "norm" not in n)


def test_the_optimizer_leaves_the_locked_tower_out():
    from evl.train.optim import build_param_groups

    enc = TextEncoder(_cfg(locked_layers=3))
    assert build_param_groups(enc, 0.05) == []                      # the whole tower locked: nothing to train
    assert build_param_groups(enc, 0.05, {"layers": 0.3}) == []     # a multiplier on a locked part: no error
    with pytest.raises(ConfigError, match="'layrs' match"):         # a typo still is one
        build_param_groups(enc, 0.05, {"layrs": 0.3})
    groups = build_param_groups(TextEncoder(_cfg(locked_layers=1)), 0.05)
    names = [n for g in groups for n in g["param_names"]]
    assert names and not any(n.startswith(("embeddings.", "layers.0.")) for n in names)


def test_new_weights_clear_the_cache():
    torch.manual_seed(0)
    enc = TextEncoder(_cfg(locked_layers=3)).train()
    ids, mask = _batch()
    before = enc(ids, mask).tokens
    other = TextEncoder(_cfg(locked_layers=3))
    enc.load_state_dict(other.state_dict())
    assert len(enc._locked_cache.rows) == 0
    after = enc(ids, mask).tokens
    torch.testing.assert_close(after, other.train()(ids, mask).tokens, rtol=0, atol=1e-6)
    assert not torch.allclose(before, after)


def test_row_cache_is_bounded_least_recently_used_and_computes_each_new_row_once():
    calls = []

    def compute(ids, mask):
        calls.append(ids.clone())
        return ids.float() * 2

    cache = RowCache(capacity=3)
    ids = torch.tensor([[1, 1], [2, 2], [1, 1], [3, 3]])
    out = cache(ids, torch.ones_like(ids), compute)
    assert torch.equal(out, ids.float() * 2)
    assert torch.equal(calls[0], torch.tensor([[1, 1], [2, 2], [3, 3]]))   # the repeated row once
    cache(torch.tensor([[4, 4]]), torch.ones(1, 2, dtype=torch.long), compute)   # evicts row 2: row 1 came again after it
    assert len(cache.rows) == 3
    cache(torch.tensor([[1, 1], [2, 2]]), torch.ones(2, 2, dtype=torch.long), compute)
    assert torch.equal(calls[-1], torch.tensor([[2, 2]]))                  # 2 was evicted, 1 was not
    n = len(calls)
    same_ids_other_mask = cache(torch.tensor([[2, 2]]), torch.tensor([[1, 0]]), compute)
    assert len(calls) == n + 1 and same_ids_other_mask.shape == (1, 2)     # the mask is part of the key
    assert torch.equal(RowCache(0)(ids, torch.ones_like(ids), compute), ids.float() * 2)


def test_model_text_features_use_the_locked_cache(tiny_model_config):
    from evl.models.model import VideoLanguageModel

    cfg = tiny_model_config()
    locked_cfg = copy.deepcopy(cfg)
    locked_cfg.text = TextEncoderConfig(**{**vars(cfg.text), "locked_layers": 1})
    torch.manual_seed(0)
    plain = VideoLanguageModel(cfg).train()
    locked = VideoLanguageModel(locked_cfg).train()
    locked.load_state_dict(plain.state_dict())
    ids = torch.randint(1, 100, (3, 5))
    mask = torch.ones_like(ids)
    a, b = plain.text_features(ids, mask), locked.text_features(ids, mask)
    torch.testing.assert_close(b.emb, a.emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(locked.text_features(ids, mask).tokens, a.tokens, rtol=0, atol=1e-6)
    assert locked.text._locked_cache.hits == 3


@pytest.mark.parametrize("kw, msg", [
    (dict(locked_layers=4), "between 0 and text.num_layers"),
    (dict(locked_layers=-1), "between 0 and text.num_layers"),
    (dict(locked_layers=3, fusion_layers=1, context_dim=8), "fused layers cannot be locked"),
    (dict(locked_cache=-1), "locked_cache must be >= 0"),
])
def test_bad_lock_settings_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw)
