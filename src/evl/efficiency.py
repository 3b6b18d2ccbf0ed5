"""Efficiency report: parameters per part, GFLOPs per clip (dual and fusion path), latency, throughput.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention), so
element-wise work (norms, GELU, softmax outside SDPA) is not counted — as in the papers' GFLOPs.
A multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from evl.models.model import VideoLanguageModel

FUSION_MARKERS = (".cross_attn.",)


def count_parameters(model: VideoLanguageModel) -> dict[str, int]:
    """Parameters per part: video tower, text tower (incl. word embeddings), fusion, heads, total.

    Backbone fusion puts its cross-attention inside the towers; those parameters count as fusion.
    """
    parts = {"video": 0, "text": 0, "fusion": 0, "heads": 0}
    for name, p in model.named_parameters():
        if name.startswith("fusion.") or any(m in name for m in FUSION_MARKERS):
            part = "fusion"
        elif name.startswith("video."):
            part = "video"
        elif name.startswith("text."):
            part = "text"
        else:
            part = "heads"
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def dummy_inputs(model: VideoLanguageModel, batch: int, frames: int, text_len: int = 32,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.cfg
    s = cfg.video.image_size
    clips = torch.randn(batch, frames, cfg.video.in_channels, s, s, device=device)
    ids = torch.randint(0, cfg.text.vocab_size, (batch, text_len), device=device)
    return clips, ids, torch.ones_like(ids)


def _flops(fn) -> int:
    """FLOPs of `fn()`. SDPA is forced onto its math path while counting: the CPU flash kernel is not
    registered with the FLOP counter and would count attention as 0 (the math path counts 4·N²·D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def gflops_per_clip(model: VideoLanguageModel, frames: int, text_len: int = 32) -> dict[str, float]:
    """GFLOPs for one (clip, caption) pair: video tower, text tower, dual total, fusion path total."""
    model.eval()
    clips, ids, mask = dummy_inputs(model, 1, frames, text_len)
    video = _flops(lambda: model.video_features(clips))
    text = _flops(lambda: model.text_features(ids, mask))
    out = {"gflops_video": video / 1e9, "gflops_text": text / 1e9, "gflops_dual": (video + text) / 1e9}
    if model.has_fusion:
        v, t = model.video_features(clips), model.text_features(ids, mask)
        fuse = _flops(lambda: model.score_pairs(v, t))
        out["gflops_fusion"] = (video + text + fuse) / 1e9
    else:
        out["gflops_fusion"] = None
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_video_encoder(model: VideoLanguageModel, batch: int, frames: int, device: torch.device,
                       warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None) -> list[float]:
    """Seconds per forward of the dual video path for `batch` clips, after `warmup` runs."""
    clips, _, _ = dummy_inputs(model, batch, frames, device=device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    times = []
    with ctx:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            model.encode_video(clips)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


@dataclass
class EfficiencyReport:
    config: str
    frames: int
    device: str
    params: dict[str, int]
    gflops_video: float
    gflops_text: float
    gflops_dual: float
    gflops_fusion: float | None
    latency_ms: dict[str, float] = field(default_factory=dict)    # batch size → median ms per forward
    throughput: dict[str, float] = field(default_factory=dict)    # batch size → clips/s

    def to_dict(self) -> dict:
        return asdict(self)


def efficiency_report(model: VideoLanguageModel, config_name: str, frames: int | None = None,
                      batch_sizes: tuple[int, ...] = (1, 4), repeats: int = 5, warmup: int = 2,
                      device: str = "cpu", precision: str = "fp32") -> EfficiencyReport:
    """Params + GFLOPs (counted on CPU) + latency/throughput of the video encoder on `device`."""
    frames = frames or model.cfg.video.num_frames
    params = count_parameters(model)
    flops = gflops_per_clip(model, frames)
    dev = torch.device(device)
    model.to(dev).eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    latency, throughput = {}, {}
    for b in batch_sizes:
        med = statistics.median(time_video_encoder(model, b, frames, dev, warmup, repeats, dtype))
        latency[str(b)] = med * 1e3
        throughput[str(b)] = b / med
    return EfficiencyReport(config=config_name, frames=frames, device=str(dev), params=params,
                            latency_ms=latency, throughput=throughput, **flops)


def format_report(r: EfficiencyReport) -> str:
    p = r.params
    lines = [f"model {r.config}  ({r.frames} frames, {r.device})",
             f"  params      total {p['total'] / 1e6:8.2f} M   video {p['video'] / 1e6:.2f} M   text {p['text'] / 1e6:.2f} M"
             f"   fusion {p['fusion'] / 1e6:.2f} M   heads {p['heads'] / 1e6:.2f} M",
             f"  GFLOPs/clip dual {r.gflops_dual:8.2f}   (video {r.gflops_video:.2f} + text {r.gflops_text:.2f})"
             + (f"   fusion path {r.gflops_fusion:.2f}" if r.gflops_fusion is not None else "")]
    for b in r.latency_ms:
        lines.append(f"  batch {b:>4}  latency {r.latency_ms[b]:9.1f} ms   throughput {r.throughput[b]:8.2f} clips/s")
    return "\n".join(lines)


def bench_config(config: str, frames: int | None = None, batch_sizes: str = "1,4", repeats: int = 10,
                 precision: str = "fp32", device: str = "auto"):
    """`evl bench model`: the efficiency report of a model config (packaged name or YAML), every option
    checked first (an error names the option, its value and the range)."""
    from evl.config import MAX_BENCH_BATCH, load_yaml
    from evl.data import MAX_FRAMES
    from evl.models.model import build_model
    from evl.train.dist import pick_device

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BENCH_BATCH:
        raise ValueError(f"--batch-sizes must list integers from 1 to {MAX_BENCH_BATCH}, separated by commas "
                         f"(e.g. 1,4), got {batch_sizes!r}")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"--frames {frames}: must be between 1 and {MAX_FRAMES} frames per clip (or leave it out "
                         "for the config's num_frames)")
    if not 1 <= repeats <= 1000:
        raise ValueError(f"--repeats {repeats}: must be between 1 and 1000 timed runs")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {precision!r}")
    device = str(pick_device(device, key="--device"))
    model = build_model(load_yaml(config, "models"))
    return efficiency_report(model, config, frames=frames, batch_sizes=sizes, repeats=repeats, device=device,
                             precision=precision)
