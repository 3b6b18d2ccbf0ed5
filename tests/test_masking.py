"""Video masking and pixel targets: exact counts, reproducibility, block clustering, keep_index,
token-order parity of patchify with the tubelet Conv3d, inverse, target normalisation, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from evl.models.masking import (
    blockwise_mask,
    keep_index_from_mask,
    normalize_targets,
    num_masked,
    patchify,
    random_mask,
    tube_mask,
    unpatchify,
)
from evl.models.video import VideoEncoder, VideoEncoderConfig

MASKS = {"random": random_mask, "tube": tube_mask, "blockwise": blockwise_mask}

grids = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))
ratios = st.floats(0.0, 0.95, allow_nan=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_slot(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    return mask.view(mask.shape[0], t, h * w)


# ------------------------------------------------------------------------------------------- counts


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), grid=grids, ratio=ratios, seed=st.integers(0, 2**31))
def test_random_mask_exact_count_per_row(batch, grid, ratio, seed):
    n = math.prod(grid)
    assume(round(ratio * n) < n)
    mask = random_mask(batch, grid, ratio, gen(seed))
    assert mask.shape == (batch, n) and mask.dtype == torch.bool
    assert (mask.sum(1) == round(ratio * n)).all()


@pytest.mark.parametrize("kind", ["tube", "blockwise"])
@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), grid=grids, ratio=ratios, seed=st.integers(0, 2**31))
def test_tube_and_blockwise_exact_count_per_slot_and_same_in_every_slot(kind, batch, grid, ratio, seed):
    t, h, w = grid
    assume(round(ratio * h * w) < h * w)
    mask = MASKS[kind](batch, grid, ratio, gen(seed))
    assert mask.shape == (batch, t * h * w) and mask.dtype == torch.bool
    slots = per_slot(mask, grid)
    assert (slots.sum(2) == round(ratio * h * w)).all()
    assert (slots == slots[:, :1]).all()


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("grid", [(1, 2, 2), (2, 4, 4), (4, 7, 7), (2, 14, 14)])
@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.75, 0.9])
def test_exact_counts_on_typical_grids(kind, grid, ratio):
    t, h, w = grid
    n = t * h * w if kind == "random" else h * w
    if round(ratio * n) >= n:
        with pytest.raises(ValueError, match="ratio"):
            MASKS[kind](2, grid, ratio, gen(0))
        return
    mask = MASKS[kind](2, grid, ratio, gen(0))
    counts = mask.sum(1) if kind == "random" else per_slot(mask, grid).sum(2)
    assert (counts == round(ratio * n)).all()


def test_num_masked_rounds_and_refuses_to_hide_everything():
    assert num_masked(100, 0.29) == 29  # int() would give 28 (0.29 * 100 = 28.999...)
    assert num_masked(196, 0.4) == 78
    assert num_masked(10, 0.0) == 0
    with pytest.raises(ValueError, match=r"ratio=0.9 .* leaving none visible"):
        num_masked(4, 0.9)


# ---------------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("kind", list(MASKS))
def test_seeded_generator_reproduces_and_seeds_differ(kind):
    grid = (2, 6, 6)
    a = MASKS[kind](4, grid, 0.5, gen(7))
    b = MASKS[kind](4, grid, 0.5, gen(7))
    c = MASKS[kind](4, grid, 0.5, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows are independent draws


@pytest.mark.parametrize("kind", list(MASKS))
def test_global_rng_when_no_generator(kind):
    torch.manual_seed(3)
    a = MASKS[kind](2, (2, 4, 4), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, MASKS[kind](2, (2, 4, 4), 0.5))


# ------------------------------------------------------------------------------------------ clustering


def masked_neighbours(mask: torch.Tensor, h: int, w: int) -> float:
    """Mean number of masked 4-neighbours per masked patch, over all masks of a (B, h*w) batch."""
    m = mask.view(-1, h, w).float()
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    return float((nb * m).sum() / m.sum())


@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.6])
def test_blockwise_is_spatially_clustered(ratio):
    grid = (1, 8, 8)
    block = masked_neighbours(blockwise_mask(200, grid, ratio, gen(0)), 8, 8)
    rand = masked_neighbours(random_mask(200, grid, ratio, gen(0)), 8, 8)
    # random: ~ ratio * 3.5 neighbours; blocks: most neighbours of a block patch are in the block
    assert block > rand + 0.5, (block, rand)


def test_blockwise_min_block_and_aspect_shape_the_blocks():
    """One block only (target = min_block area, aspect 1): the mask is a 3x3 square, never random."""
    mask = blockwise_mask(50, (1, 8, 8), 9 / 64, gen(0), min_block=9, aspect=(1.0, 1.0)).view(50, 8, 8)
    for m in mask:
        rows, cols = m.nonzero().unbind(1)
        assert (rows.max() - rows.min(), cols.max() - cols.min()) == (2, 2)


# ------------------------------------------------------------------------------------------ keep_index


@pytest.mark.parametrize("kind", list(MASKS))
def test_keep_index_sorted_and_complementary(kind):
    grid = (2, 4, 4)
    mask = MASKS[kind](3, grid, 0.5, gen(1))
    keep = keep_index_from_mask(mask)
    assert keep.dtype == torch.long and keep.shape == (3, 32 - int(mask[0].sum()))
    assert (keep.diff(dim=1) > 0).all()
    assert not mask.gather(1, keep).any()
    rebuilt = torch.ones_like(mask).scatter(1, keep, False)
    assert torch.equal(rebuilt, mask)


def test_keep_index_edge_cases_and_errors():
    assert torch.equal(keep_index_from_mask(torch.zeros(2, 3, dtype=torch.bool)), torch.tensor([[0, 1, 2]] * 2))
    assert keep_index_from_mask(torch.ones(2, 3, dtype=torch.bool)).shape == (2, 0)
    uneven = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match=r"different numbers of tokens \(\[2, 1\]\)"):
        keep_index_from_mask(uneven)
    with pytest.raises(ValueError, match="mask must be a .*bool"):
        keep_index_from_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask must be a"):
        keep_index_from_mask(torch.zeros(3, dtype=torch.bool))


def test_video_encoder_accepts_tube_keep_index_with_divided_attention():
    cfg = VideoEncoderConfig(image_size=32, patch_size=16, tubelet_size=2, num_frames=4, hidden_size=32,
                             num_layers=2, num_heads=2, attention="divided")
    torch.manual_seed(0)
    enc = VideoEncoder(cfg).eval()
    frames = torch.randn(2, 4, 3, 32, 32, generator=gen(0))
    grid = enc.check_frames(frames)
    for make in (tube_mask, blockwise_mask):
        keep = keep_index_from_mask(make(2, grid, 0.5, gen(0)))
        with torch.no_grad():
            out = enc(frames, keep_index=keep)
        assert keep.shape == (2, 4)
        assert out.tokens.shape == (2, 1 + 4, 32) and torch.isfinite(out.tokens).all()


# ----------------------------------------------------------------------------------- pixel targets


def copy_conv(channels: int, patch: int, tubelet: int) -> nn.Conv3d:
    """Tubelet Conv3d whose output channel ((dt*p + dy)*p + dx)*C + c copies input value [c, dt, dy, dx]."""
    d = tubelet * patch * patch * channels
    conv = nn.Conv3d(channels, d, (tubelet, patch, patch), stride=(tubelet, patch, patch), dtype=torch.float64)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for dt in range(tubelet):
            for dy in range(patch):
                for dx in range(patch):
                    for c in range(channels):
                        conv.weight[((dt * patch + dy) * patch + dx) * channels + c, c, dt, dy, dx] = 1.0
    return conv


@pytest.mark.parametrize("shape,patch,tubelet", [((2, 4, 3, 4, 6), 2, 2), ((1, 3, 2, 6, 3), 3, 1),
                                                 ((2, 2, 1, 2, 2), 1, 2)])
def test_patchify_matches_tubelet_conv_token_order(shape, patch, tubelet):
    frames = torch.randn(*shape, generator=gen(0), dtype=torch.float64)
    conv = copy_conv(shape[2], patch, tubelet)
    with torch.no_grad():
        tokens = conv(frames.transpose(1, 2)).flatten(2).transpose(1, 2)
    assert torch.equal(patchify(frames, patch, tubelet), tokens)


def test_patchify_matches_the_video_encoders_own_embedding():
    """Same check through VideoEncoder.embed itself (positions zeroed), so a change there is caught."""
    cfg = VideoEncoderConfig(image_size=8, patch_size=4, tubelet_size=2, num_frames=4, hidden_size=96,
                             num_layers=1, num_heads=2, use_cls_token=False)
    enc = VideoEncoder(cfg).double()
    with torch.no_grad():
        enc.patch_embed.load_state_dict(copy_conv(3, 4, 2).state_dict())
        enc.pos_embed.temporal.zero_()
        enc.pos_embed.spatial.zero_()
        frames = torch.randn(2, 4, 3, 8, 8, generator=gen(1), dtype=torch.float64)
        tokens = enc.embed(frames).x
    assert torch.equal(patchify(frames, 4, 2), tokens)


@pytest.mark.parametrize("shape,patch,tubelet", [((2, 4, 3, 4, 6), 2, 2), ((1, 6, 1, 9, 3), 3, 3)])
def test_unpatchify_is_exact_inverse(shape, patch, tubelet):
    frames = torch.randn(*shape, generator=gen(2))
    b, t, c, h, w = shape
    grid = (t // tubelet, h // patch, w // patch)
    patches = patchify(frames, patch, tubelet)
    assert patches.shape == (b, math.prod(grid), tubelet * patch * patch * c)
    assert torch.equal(unpatchify(patches, grid, patch, tubelet, c), frames)
    assert torch.equal(patchify(unpatchify(patches, grid, patch, tubelet, c), patch, tubelet), patches)


def test_normalize_targets_hand_computed():
    # one token, 4 values per channel, channel-last: channel 0 = 1, 2, 3, 4; channel 1 constant 5
    patches = torch.tensor([[[1.0, 5.0, 2.0, 5.0, 3.0, 5.0, 4.0, 5.0]]])
    out = normalize_targets(patches, channels=2)
    std = math.sqrt(5 / 3)  # unbiased: ((1.5² + 0.5²) * 2) / 3
    expected0 = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-6)
    assert out.shape == patches.shape
    torch.testing.assert_close(out[0, 0, 0::2], expected0)
    assert torch.equal(out[0, 0, 1::2], torch.zeros(4))  # flat channel: 0 / (0 + eps), not NaN


def test_normalize_targets_per_tubelet_per_channel_statistics():
    frames = torch.rand(2, 4, 3, 8, 8, generator=gen(3)) * 5 + 2
    out = normalize_targets(patchify(frames, 4, 2), channels=3).view(2, 8, 32, 3)
    torch.testing.assert_close(out.mean(dim=2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=2), torch.ones(2, 8, 3), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kind", list(MASKS))
def test_mask_arguments_are_validated_by_name(kind):
    make = MASKS[kind]
    for ratio in (1.0, -0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
            make(2, (2, 4, 4), ratio)
    for grid in ((0, 4, 4), (2, 4), (2, 4.0, 4), (2, -1, 4)):
        with pytest.raises(ValueError, match=r"grid must be three positive ints .* got"):
            make(2, grid, 0.5)
    for batch in (0, -1, 2.0):
        with pytest.raises(ValueError, match=r"batch must be a positive int, got"):
            make(batch, (2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        make(2, (2, 4, 4), 0.5, generator=0)


def test_blockwise_options_are_validated_by_name():
    with pytest.raises(ValueError, match="min_block must be a positive int, got 0"):
        blockwise_mask(1, (1, 4, 4), 0.5, min_block=0)
    with pytest.raises(ValueError, match="max_tries must be a positive int, got 0"):
        blockwise_mask(1, (1, 4, 4), 0.5, max_tries=0)
    with pytest.raises(ValueError, match=r"aspect must be two positive numbers .* got \(0, 2\)"):
        blockwise_mask(1, (1, 4, 4), 0.5, aspect=(0, 2))


def test_patch_arguments_are_validated_by_name():
    frames = torch.zeros(1, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="patch_size=3"):
        patchify(frames, 3, 2)
    with pytest.raises(ValueError, match="tubelet_size=3"):
        patchify(frames, 4, 3)
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        patchify(frames, 0, 2)
    with pytest.raises(ValueError, match=r"frames must be a \(B, T, C, H, W\) tensor"):
        patchify(frames[0], 4, 2)
    patches = patchify(frames, 4, 2)
    with pytest.raises(ValueError, match=r"N=8 tokens but grid=\(2, 2, 1\)"):
        unpatchify(patches, (2, 2, 1), 4, 2, 3)
    with pytest.raises(ValueError, match="96 values per token, expected .* = 64"):
        unpatchify(patches, (2, 2, 2), 4, 2, 2)
    with pytest.raises(ValueError, match="not divisible by channels=5"):
        normalize_targets(patches, channels=5)
    with pytest.raises(ValueError, match="unbiased std needs at least 2"):
        normalize_targets(patchify(frames, 1, 1), channels=3)
    with pytest.raises(ValueError, match="patches must be a float"):
        normalize_targets(patches.long(), channels=3)
