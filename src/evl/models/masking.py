"""Masks over the video patch grid and pixel targets in the same token order (masked video modelling).

Every function here speaks the token order of the video tower's tubelet embedding
(`VideoEncoder.embed`: `Conv3d(kernel=stride=(t, p, p))` on `frames.transpose(1, 2)`, then
`.flatten(2).transpose(1, 2)`): over the grid (t', h', w') = (T/t, H/p, W/p), token

    n = (slot * h' + row) * w' + col

so a mask made here, the `keep_index` built from it, and the targets from `patchify` all index the
same tokens. Masks are bool tensors of shape (B, t'·h'·w'), True = masked (hidden from the encoder, a
reconstruction target), as in MAE / VideoMAE.

Mask kinds (VideoMAE-style small pure functions):

* `random_mask`     — MAE: each token independently of place, exact count per row.
* `tube_mask`       — VideoMAE: one random spatial mask repeated in every time slot, so a masked patch
                      cannot be copied from the same place in a neighbouring frame.
* `blockwise_mask`  — BEiT / BEiT-v2: rectangular blocks of patches, also repeated in every slot.

Exact counts matter: the encoder gathers the kept tokens into a dense (B, K, D) tensor, so every row
must keep the same number, and its divided (time / space) attention needs the same number in every
time slot — which tube and blockwise masks give by construction, and `random_mask` in general does not.

The number of masked patches is `round(ratio * n)` with Python's `round` (half to even), not VideoMAE's
`int(ratio * n)`: `int` turns 0.29 * 100 = 28.999... into 28. See `num_masked`.

Randomness comes only from the optional CPU `generator`, so masks are reproducible; masks are made on
the CPU (data-loader side) — move them with `.to(device)`.
"""

from __future__ import annotations

import math

import torch

Grid = tuple[int, int, int]

# ------------------------------------------------------------------------------------------ validation


def _check_positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}; {hint}")
    return value


def _check_batch(batch: object) -> int:
    return _check_positive_int(batch, "batch", "pass the number of clips in the batch (>= 1)")


def _check_grid(grid: object) -> Grid:
    """A (t', h', w') patch grid of positive ints (e.g. `VideoEncoderOutput.grid` or `check_frames`)."""
    ok = (isinstance(grid, (tuple, list)) and len(grid) == 3
          and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid))
    if not ok:
        raise ValueError(f"grid must be three positive ints (t', h', w') = (frames/tubelet, height/patch, "
                         f"width/patch), got {grid!r}; take it from VideoEncoder.check_frames(frames)")
    return int(grid[0]), int(grid[1]), int(grid[2])


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1) (the fraction of patches to mask), got {ratio!r}; "
                         "VideoMAE uses 0.9, MAE 0.75, BEiT 0.4")
    return float(ratio)


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                         "use torch.Generator().manual_seed(seed)")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (masks are drawn on the CPU), got one on "
                         f"{generator.device}; use torch.Generator() without a device")
    return generator


def num_masked(n: int, ratio: float) -> int:
    """How many of `n` patches a mask with `ratio` hides: `round(ratio * n)`, at most n - 1.

    Raises when the rounding would hide every patch (e.g. ratio 0.9 on a 2x2 slot rounds 3.6 to 4):
    an encoder with nothing to see is a silent waste of a step, so the caller must lower the ratio or
    use a larger grid.
    """
    ratio = _check_ratio(ratio)
    count = round(ratio * n)
    if count >= n:
        raise ValueError(f"ratio={ratio} masks round({ratio} * {n}) = {count} of {n} patches, leaving none "
                         f"visible; lower ratio below {(n - 0.5) / n:.4g} or use a larger patch grid")
    return count


# ------------------------------------------------------------------------------------------------ masks


def random_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE random masking: exactly `num_masked(N, ratio)` of the N = t'·h'·w' tokens per row, uniformly.

    Drawn as the first k of a random permutation (argsort of uniform noise), the way MAE does it, so
    every k-subset is equally likely. Counts per time slot vary: not for divided attention.
    """
    batch, (t, h, w), generator = _check_batch(batch), _check_grid(grid), _check_generator(generator)
    n = t * h * w
    k = num_masked(n, ratio)
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _repeat_over_slots(spatial: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, h'·w') spatial mask → (B, t'·h'·w') with the same mask in every time slot (token order)."""
    b, s = spatial.shape
    return spatial[:, None, :].expand(b, slots, s).reshape(b, slots * s)


def tube_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAE tube masking: one random spatial mask of exactly `num_masked(h'·w', ratio)` patches per
    row, repeated in every time slot.

    Why tubes: video is redundant in time, so a patch hidden in one frame but visible at the same place
    in the next is reconstructed by copying; hiding the whole tube forces the model to use content.
    """
    batch, (t, h, w), generator = _check_batch(batch), _check_grid(grid), _check_generator(generator)
    return _repeat_over_slots(random_mask(batch, (1, h, w), ratio, generator), t)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (both ends included, like Python's random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _place_block(mask: torch.Tensor, remaining: int, min_block: int, log_aspect: tuple[float, float],
                 max_tries: int, generator: torch.Generator | None) -> int:
    """Try (up to `max_tries` times) to mask one rectangle in the (h', w') `mask` in place; return how
    many new patches it masked (0 = every try failed).

    BEiT's rule: area uniform in [min_block, remaining], log aspect uniform, and a block is accepted only
    if it adds between 1 and `remaining` new patches, so blocks never overshoot the target. Unlike BEiT
    (strict `<`), a block may span the whole height or width, which matters on small grids.
    """
    height, width = mask.shape
    for _ in range(max_tries):
        area = _uniform(min_block, max(min_block, remaining), generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        bh = int(round(math.sqrt(area * aspect)))
        bw = int(round(math.sqrt(area / aspect)))
        if not (1 <= bh <= height and 1 <= bw <= width):
            continue
        top = _randint(0, height - bh, generator)
        left = _randint(0, width - bw, generator)
        block = mask[top:top + bh, left:left + bw]
        new = bh * bw - int(block.sum())
        if 0 < new <= remaining:
            block.fill_(True)
            return new
    return 0


def _set_exact_count(mask: torch.Tensor, target: int, generator: torch.Generator | None) -> torch.Tensor:
    """Mask or unmask random patches of the flat `mask` (in place) until exactly `target` are masked.

    BEiT-v2's fix-up: block placement stops short when no block fits the remainder; the rest is drawn
    uniformly so every row has the exact count the encoder's dense gather needs.
    """
    count = int(mask.sum())
    if count != target:
        pool = (~mask if count < target else mask).nonzero().squeeze(1)
        pick = pool[torch.randperm(len(pool), generator=generator)[:abs(target - count)]]
        mask[pick] = count < target
    return mask


def _blockwise_spatial(height: int, width: int, target: int, min_block: int, log_aspect: tuple[float, float],
                       max_tries: int, generator: torch.Generator | None) -> torch.Tensor:
    """One (h'·w',) BEiT blockwise mask with exactly `target` patches masked."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = 0
    while count < target:
        added = _place_block(mask, target - count, min_block, log_aspect, max_tries, generator)
        if added == 0:
            break
        count += added
    return _set_exact_count(mask.view(-1), target, generator)


def _check_blockwise_options(min_block: object, aspect: object, max_tries: object) -> tuple[float, float]:
    """Validate the block shape options; return the log-aspect range (log a, log 1/a) sorted."""
    _check_positive_int(min_block, "min_block", "it is the smallest block area in patches (e.g. 4)")
    _check_positive_int(max_tries, "max_tries", "it is the number of placements tried per block (e.g. 10)")
    ok = (isinstance(aspect, (tuple, list)) and len(aspect) == 2
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 for a in aspect))
    if not ok:
        raise ValueError(f"aspect must be two positive numbers (min, max) of block height/width, got {aspect!r}; "
                         "BEiT uses (0.3, 1 / 0.3)")
    low, high = sorted((math.log(aspect[0]), math.log(aspect[1])))
    return low, high


def blockwise_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None,
                   min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                   max_tries: int = 10) -> torch.Tensor:
    """BEiT-style blockwise masking of exactly `num_masked(h'·w', ratio)` patches per time slot, with the
    same spatial mask in every slot (like `tube_mask`), one draw per row.

    Blocks are rectangles of area >= `min_block` patches with log(height/width) uniform in
    [log aspect[0], log aspect[1]]; each block gets `max_tries` placements, and when no block fits any
    more the count is topped up with random single patches (BEiT-v2), so counts are always exact.

    Why blocks: neighbouring patches are highly correlated, so isolated holes are filled by
    interpolation; hiding contiguous regions makes the target semantic (BEiT, E-ViLM's MVM).

    `min_block=4` (a 2x2 block), not BEiT's 16: BEiT's 16 is ~8% of its 14x14 grid, but evl's grids are
    often far smaller (a 112-pixel clip with 16-pixel patches is 7x7; test configs are 2x2 to 4x4), where
    a 16-patch block is the whole slot or does not fit at all and the mask degrades to the random top-up.
    Pass `min_block=16` on a 14x14 grid to reproduce BEiT. Measured here, the random top-up supplies
    ~1% of the masked patches on 14x14 (min_block 16) and <1% on 4x4 to 14x14 (min_block 4), but all of
    them on a 2x2 slot, where no block of >= 4 patches fits under a count of 2: there it is a tube mask.
    """
    batch, (t, h, w), generator = _check_batch(batch), _check_grid(grid), _check_generator(generator)
    log_aspect = _check_blockwise_options(min_block, aspect, max_tries)
    target = num_masked(h * w, ratio)
    rows = [_blockwise_spatial(h, w, target, min_block, log_aspect, max_tries, generator) for _ in range(batch)]
    return _repeat_over_slots(torch.stack(rows), t)


def keep_index_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask (True = masked) → (B, K) long indices of the *unmasked* tokens, ascending per row.

    This is the `keep_index` the video encoder takes: sorted rows keep tokens slot by slot, which its
    divided attention requires (and tube / blockwise masks also give it equal counts per slot). Every row
    must keep the same number K, since the kept tokens are gathered into a dense (B, K, D) tensor.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, N) bool tensor (True = masked), got a {got}; "
                         "make it with random_mask / tube_mask / blockwise_mask")
    kept = (~mask).sum(dim=1)
    if kept.numel() and bool((kept != kept[0]).any()):
        raise ValueError(f"mask rows keep different numbers of tokens ({kept.tolist()}); keep_index needs the "
                         "same count in every row — use random_mask / tube_mask / blockwise_mask, which mask an "
                         "exact count per row")
    k = int(kept[0]) if kept.numel() else 0
    # nonzero() lists (row, col) pairs in row-major order, so each row's columns come out ascending.
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], k)


# --------------------------------------------------------------------------------------- pixel targets


def _check_patch_sizes(patch_size: object, tubelet_size: object) -> tuple[int, int]:
    p = _check_positive_int(patch_size, "patch_size", "use the video encoder's cfg.patch_size")
    t = _check_positive_int(tubelet_size, "tubelet_size", "use the video encoder's cfg.tubelet_size")
    return p, t


def patchify(frames: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """(B, T, C, H, W) frames → (B, N, t·p·p·C) patches, in exactly the tubelet conv's token order.

    Within a patch, values are ordered (t, p_row, p_col, C) — channel fastest — as in VideoMAE's
    `rearrange(... 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)')`, so per-channel statistics
    (`normalize_targets`) and VideoMAE decoders / checkpoints line up.
    """
    p, t = _check_patch_sizes(patch_size, tubelet_size)
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a (B, T, C, H, W) tensor, got {got}")
    b, frames_t, c, height, width = frames.shape
    if frames_t % t:
        raise ValueError(f"frames has T={frames_t} frames, not a multiple of tubelet_size={t}; "
                         "sample a multiple of tubelet_size frames")
    if height % p or width % p:
        raise ValueError(f"frame size {height}x{width} is not divisible by patch_size={p}; "
                         "resize/crop to a multiple of the patch size")
    gt, gh, gw = frames_t // t, height // p, width // p
    x = frames.reshape(b, gt, t, c, gh, p, gw, p)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, t', h', w', t, p, p, C)
    return x.reshape(b, gt * gh * gw, t * p * p * c)


def unpatchify(patches: torch.Tensor, grid: Grid, patch_size: int, tubelet_size: int,
               channels: int) -> torch.Tensor:
    """(B, N, t·p·p·C) patches in token order → (B, T, C, H, W) frames; the exact inverse of `patchify`
    (to look at reconstructions, or to paste predictions back into a clip)."""
    gt, gh, gw = _check_grid(grid)
    p, t = _check_patch_sizes(patch_size, tubelet_size)
    c = _check_positive_int(channels, "channels", "pass the number of colour channels (3 for RGB)")
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3:
        got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"patches must be a (B, N, t*p*p*C) tensor, got {got}")
    b, n, d = patches.shape
    if n != gt * gh * gw:
        raise ValueError(f"patches has N={n} tokens but grid={grid!r} has {gt * gh * gw}; pass the grid the "
                         "patches were made on")
    if d != t * p * p * c:
        raise ValueError(f"patches has {d} values per token, expected tubelet_size*patch_size**2*channels = "
                         f"{t}*{p}**2*{c} = {t * p * p * c}; check patch_size, tubelet_size and channels")
    x = patches.reshape(b, gt, gh, gw, t, p, p, c)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, t', t, C, h', p, w', p)
    return x.reshape(b, gt * t, c, gh * p, gw * p)


def normalize_targets(patches: torch.Tensor, channels: int, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's normalised pixel targets: per tubelet and per channel, (x - mean) / (std + eps) over
    the t·p·p values of that channel, with the unbiased std (as VideoMAE's `var(unbiased=True)`).

    Why: normalised targets remove each patch's brightness and contrast, so the loss rewards structure,
    not colour averages; VideoMAE reports better features with them. `patches` is (..., t·p·p·C) in
    `patchify`'s (t, p, p, C) order; the result has the same shape.
    """
    c = _check_positive_int(channels, "channels", "pass the number of colour channels (3 for RGB)")
    if not isinstance(patches, torch.Tensor) or patches.dim() < 1 or not patches.is_floating_point():
        got = (f"{patches.dtype} tensor of shape {tuple(patches.shape)}" if isinstance(patches, torch.Tensor)
               else type(patches).__name__)
        raise ValueError(f"patches must be a float (..., t*p*p*C) tensor from patchify, got a {got}")
    d = patches.shape[-1]
    if d % c:
        raise ValueError(f"patches have {d} values per token, not divisible by channels={c}; "
                         "pass the channel count the patches were made with")
    if d // c < 2:
        raise ValueError(f"patches have {d // c} value(s) per channel; the unbiased std needs at least 2 — "
                         "normalised targets need tubelet_size*patch_size**2 >= 2")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be >= 0 (it keeps flat patches finite), got {eps!r}")
    x = patches.reshape(*patches.shape[:-1], d // c, c)
    mean = x.mean(dim=-2, keepdim=True)
    std = x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + eps)).reshape(patches.shape)
