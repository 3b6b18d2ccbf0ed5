"""The decoded-frame cache (`evl.data.frame_cache`, `data.frame_cache_mb`): exact LRU accounting, clips read
through it equal to clips decoded afresh, nothing stored from a bad file, and training with it identical."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from tests.test_video import decoded_indices, indexed_video

from evl.data import video_pyav
from evl.data.datasets import DataConfig
from evl.data.frame_cache import FrameCache, frame_cache
from evl.data.video import load_clip
from evl.errors import ConfigError, VideoDecodeError


def _frame(value: int, nbytes: int = 100) -> np.ndarray:
    return np.full(nbytes, value, np.uint8)


def test_lru_keeps_the_budget_exactly():
    cache = FrameCache(capacity_bytes=250)
    a, b = ("a", 1, 1), ("b", 1, 1)
    cache.put(a, {0: _frame(1), 1: _frame(2)})
    assert len(cache) == 2 and cache.bytes == 200
    assert set(cache.get(a, [0])) == {0}          # frame 0 is now the most recently used
    cache.put(b, {0: _frame(3)})                   # 300 bytes > 250: the least recently used (a, 1) goes
    assert len(cache) == 2 and cache.bytes == 200
    assert set(cache.get(a, [0, 1])) == {0} and set(cache.get(b, [0, 5])) == {0}
    assert (cache.hits, cache.misses) == (3, 2)
    cache.put(b, {9: _frame(4, nbytes=251)})       # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2 and cache.bytes == 200
    cache.put(a, {0: _frame(99)})                  # already cached: the first copy stays
    assert int(cache.get(a, [0])[0][0]) == 1


def test_cached_frames_are_read_only():
    cache = FrameCache(capacity_bytes=1000)
    cache.put(("a", 1, 1), {0: _frame(1)})
    with pytest.raises(ValueError, match="read-only"):
        cache.get(("a", 1, 1), [0])[0][0] = 5


def test_zero_budget_keeps_nothing_and_bad_budgets_are_refused():
    cache = FrameCache()
    cache.put(("a", 1, 1), {0: _frame(1)})
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match=">= 0"):
        FrameCache(-1)
    for bad in (-1, True, "10"):
        with pytest.raises(ValueError, match="MiB >= 0"):
            frame_cache(bad)


def test_process_cache_takes_the_largest_budget_and_pickles_to_the_process_one():
    cache = frame_cache(0)
    before = cache.capacity
    try:
        assert frame_cache(1).capacity == max(before, 2**20)
        assert frame_cache(0.5).capacity == max(before, 2**20)   # a smaller request keeps the larger budget
        assert pickle.loads(pickle.dumps(cache)) is cache          # a worker maps it to its own process cache
    finally:
        cache.capacity = before


def test_clip_through_the_cache_equals_a_fresh_decode(tmp_path):
    path = indexed_video(tmp_path / "v.mp4", 30)
    cache = FrameCache(capacity_bytes=2**24)
    seen: set[int] = set()
    for seed in range(4):
        fresh = load_clip(path, 6, "random", rng=random.Random(seed))
        cached = load_clip(path, 6, "random", rng=random.Random(seed), cache=cache)
        assert torch.equal(fresh.frames, cached.frames) and torch.equal(fresh.frame_mask, cached.frame_mask)
        assert cached.indices == fresh.indices
        seen.update(fresh.indices)
    hits, misses = cache.hits, cache.misses
    again = load_clip(path, indices=[0, 29, 29, 3], cache=cache)
    assert decoded_indices(again) == [0, 29, 29, 3]
    assert cache.hits - hits == len({0, 3, 29} & seen) and cache.misses - misses == len({0, 3, 29} - seen)
    assert len(cache) == len(seen | {0, 3, 29})


def test_fully_cached_clip_opens_no_file(tmp_path, monkeypatch):
    path = indexed_video(tmp_path / "v.mp4", 12)
    cache = FrameCache(capacity_bytes=2**24)
    first = load_clip(path, 4, "uniform", cache=cache)

    def no_decode(*a, **k):
        raise AssertionError("decoded although every frame was cached")

    monkeypatch.setattr("evl.data.video._decode_pyav", no_decode)
    second = load_clip(path, 4, "uniform", cache=cache)
    assert torch.equal(first.frames, second.frames) and cache.hits == 4 and cache.misses == 4


def test_rewritten_file_is_decoded_afresh(tmp_path):
    path = indexed_video(tmp_path / "v.mp4", 10)
    cache = FrameCache(capacity_bytes=2**24)
    assert decoded_indices(load_clip(path, indices=[2], cache=cache)) == [2]
    frames = {i: np.full((64, 64, 3), 0, np.uint8) for i in range(10)}
    key = next(iter(cache._frames))[0]
    cache.put(key, frames)              # what a stale entry would return: black frames
    indexed_video(path, 14)             # rewritten: new size / mtime → new key
    video_pyav._TABLE_CACHE.clear()
    assert decoded_indices(load_clip(path, indices=[2, 13], cache=cache)) == [2, 13]


def test_bad_file_stores_nothing(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n" * 50)
    cache = FrameCache(capacity_bytes=2**24)
    with pytest.raises(VideoDecodeError, match="not a readable media file"):
        load_clip(bad, 4, cache=cache)
    assert len(cache) == 0 and cache.bytes == 0


def test_data_config_refuses_bad_cache_settings():
    with pytest.raises(ConfigError, match=r"data.frame_cache_mb=-1.*>= 0 MiB"):
        DataConfig(train="x.json", frame_cache_mb=-1)
    with pytest.raises(ConfigError, match="data.backend=pyav or data.frame_cache_mb=0"):
        DataConfig(train="x.json", frame_cache_mb=64, backend="decord")
    assert DataConfig(train="x.json", frame_cache_mb=64).frame_cache_mb == 64


def test_training_with_the_cache_is_identical(one_torch_thread, synthvl, tmp_path, tiny_model_dict_factory):
    """Same seed, fp32: the losses of 6 steps (three epochs of the tiny set's training clips) are
    bit-identical with and without the cache, and the cached run reads cached frames."""
    from evl.recipes import load_recipe, run_recipe

    model = tiny_model_dict_factory("encoder", vocab_size=30522)   # the packaged MiniLM tokenizer's
    ann = synthvl / "annotations"
    cache = frame_cache(0)
    losses = []
    for name, mb in (("plain", 0), ("cached", 64)):
        out = tmp_path / name
        cfg = load_recipe(None, ["task=pretrain", f"data.train={ann / 'retrieval_train.json'}",
                                 f"data.frame_cache_mb={mb}", "objectives={vtc: 1.0}", "train.max_steps=6",
                                 "train.batch_size=4", "train.ckpt_every=0", "train.log_every=1",
                                 "train.warmup_steps=0", "train.precision=fp32", f"train.out_dir={out}",
                                 f"model={json.dumps(model)}"])
        hits = cache.hits
        run_recipe(cfg, evaluate=False)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses.append([r["loss"] for r in rows if "loss" in r and "step" in r])
        if mb:
            assert cache.hits > hits
    assert len(losses[0]) == 6 and losses[0] == losses[1]
