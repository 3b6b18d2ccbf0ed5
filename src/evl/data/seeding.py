"""Seeding data loading: randomness inside a sample (augmentation, masks) is drawn from (seed, epoch, sample
id), never from whatever state a loader worker happens to have, so it does not depend on the number of
workers, on which worker got the sample, or on where a run was resumed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, sample index).

    SeedSequence hashes its input, so neighbouring indices give unrelated streams (a plain
    `seed + index` would make sample i of epoch 1 share the stream of sample i+1 of epoch 0).
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), python `random` and numpy for the block, then restore their previous states.

    Restoring matters when data loads in the main process (num_workers=0): the model's dropout stream
    must not be disturbed by data loading, or losses would depend on `num_workers`.
    """
    torch_state = torch.random.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
