"""Image transforms on uint8 video tensors (T, C, H, W), without torchvision.

Small pure functions: the same crop is applied to every frame of a clip (a per-frame crop would make
objects jitter, which is motion the model would learn). Pixels stay uint8 until the last step, so
the expensive work (resize) runs on the smallest tensor and collation moves 4x fewer bytes.
No horizontal flip: captions and questions say "left"/"right", and flipping silently breaks them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ImageNet statistics; VideoMAE and most ViT video encoders were pre-trained with these.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
VIDEOMAE_MEAN, VIDEOMAE_STD = IMAGENET_MEAN, IMAGENET_STD
# CLIP/EVA-CLIP statistics, for image towers initialised from CLIP-style weights.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _check_video(frames: torch.Tensor, name: str = "frames") -> None:
    """Transforms take uint8 (T, C, H, W); anything else is a caller bug worth a clear message."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.dtype != torch.uint8:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        dtype = frames.dtype if isinstance(frames, torch.Tensor) else ""
        raise ValueError(f"{name} must be a uint8 tensor (T, C, H, W), got {shape} {dtype}")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """`size` as (height, width); an int means a square."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`, keeping the aspect ratio (bilinear, antialiased).

    Antialiasing matters when shrinking (640x360 → 64 px): plain bilinear aliases thin edges.
    Returns the input unchanged when the short side already equals `size`.
    """
    _check_video(frames)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    h, w = frames.shape[-2:]
    if min(h, w) == size:
        return frames
    if h <= w:
        new_h, new_w = size, max(1, round(w * size / h))
    else:
        new_h, new_w = max(1, round(h * size / w)), size
    out = F.interpolate(frames.float(), size=(new_h, new_w), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def center_crop(frames: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The central `size` region of every frame (evaluation); errors if the frames are smaller."""
    _check_video(frames)
    ch, cw = _pair(size)
    h, w = frames.shape[-2:]
    _check_fits(h, w, ch, cw)
    top, left = (h - ch) // 2, (w - cw) // 2
    return frames[..., top: top + ch, left: left + cw]


def random_crop(frames: torch.Tensor, size: int | Sequence[int], rng: random.Random | None = None) -> torch.Tensor:
    """One random `size` region, the same for all frames (training augmentation).

    `rng` defaults to the `random` module, which PyTorch's DataLoader seeds per worker.
    """
    _check_video(frames)
    ch, cw = _pair(size)
    h, w = frames.shape[-2:]
    _check_fits(h, w, ch, cw)
    r = rng if rng is not None else random
    top, left = r.randint(0, h - ch), r.randint(0, w - cw)
    return frames[..., top: top + ch, left: left + cw]


def _check_fits(h: int, w: int, ch: int, cw: int) -> None:
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the frames {h}x{w}; resize first")


def to_float_normalized(frames: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """float32 (T, C, H, W): (pixels / 255 - mean) / std per channel."""
    _check_video(frames)
    c = frames.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return (frames.float() / 255.0 - m) / s


@dataclass
class VideoTransform:
    """uint8 clip (T, C, H, W) → normalised float32 (T, C, size, size) for a dataset.

    Evaluation: resize the short side to `size`, center crop (a square video keeps every pixel).
    Training: resize the short side to `round(size * train_scale)`, then a random crop of `size`
    shared by all frames — a mild scale/translation augmentation.
    """

    size: int = 224
    train: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train_scale: float = 1.15

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"VideoTransform.size must be positive, got {self.size}")
        if self.train_scale < 1.0:
            raise ValueError(f"VideoTransform.train_scale must be >= 1 (crop after upscaling), got {self.train_scale}")

    def __call__(self, frames: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if self.train:
            frames = resize_short_side(frames, max(self.size, round(self.size * self.train_scale)))
            frames = random_crop(frames, self.size, rng)
        else:
            frames = center_crop(resize_short_side(frames, self.size), self.size)
        return to_float_normalized(frames, self.mean, self.std)
