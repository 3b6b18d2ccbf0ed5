"""`evl export CKPT --format onnx --out DIR`: the dual encoder as two ONNX graphs, fp32 and int8.

    DIR/video.onnx        frames (B, T, 3, S, S) float32 + frame_mask (B, T) bool → embedding (B, E)
    DIR/text.onnx         input_ids (B, L) int64 + attention_mask (B, L) int64 → embedding (B, E)
    DIR/video.int8.onnx   the same graphs with weights quantised to int8 (ONNX Runtime's dynamic
    DIR/text.int8.onnx    quantisation: MatMul/Gemm weights int8 with 7-bit range — per tensor for video,
                          per channel for text —, activations quantised per call)
    DIR/tokenizer.json, config.json (the checkpoint's), export.json (shapes, source, parity measured here)

Batch (and text length) are dynamic axes. The graphs are traced with PyTorch's TorchScript exporter
(opset 17; torch.export's exporter needs onnxscript and was not needed here) from the model in eval mode; every export is checked against eager PyTorch on a random
batch with a padded frame and texts of different lengths: fp32 must agree within 1e-4 (max absolute
difference of the unit-norm embeddings) or the export fails; the int8 graphs' difference and cosine to
eager fp32 are measured and recorded (`export.json`), not bounded here — `benchmarks/inference.py`
reports what they cost in retrieval R@1. `evl.load(DIR)` runs them (`backend="onnx"` / `"onnx-int8"`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from evl.data import MAX_FRAMES
from evl.errors import CheckpointError, ConfigError

FP32_TOLERANCE = 1e-4
OPSET = 17


class EncoderGraph(nn.Module):
    """What video.onnx / text.onnx compute: `VideoLanguageModel.encode_video(frames, frame_mask)` or
    `encode_text(input_ids, attention_mask)` (`method`), as a module to trace."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(a, b)


def _examples(model, batch: int, tokenizer, num_frames: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    v = model.cfg.video
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, num_frames, v.in_channels, v.image_size, v.image_size, generator=g)
    mask = torch.ones(batch, num_frames, dtype=torch.bool)
    mask[0, num_frames - v.tubelet_size:] = False    # one clip shorter than num_frames (row 0: also checked)
    texts = ["a red circle moves left", "the square grows and then a blue star spins around", "a cross"]
    tok = tokenizer((texts * batch)[:batch], max_length=32)
    return (frames, mask), (tok.input_ids, tok.attention_mask)


def _quantize(src: Path, dst: Path, per_channel: bool) -> None:
    """int8 weights for MatMul/Gemm only: the patch embedding stays a float Conv (ONNX Runtime's integer
    Conv is slower than its float one on CPUs). The video encoder takes one scale per tensor (faster;
    its embeddings stay close to fp32); the text encoder one per output channel — with one scale per
    tensor MiniLM's embeddings drifted much further from fp32 in development. export.json records both."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # its advice to pre-process the graph first is printed on the root logger
    try:
        # reduce_range (7-bit weights): CPUs without VNNI (AVX2, early AVX512) multiply uint8 activations by
        # int8 weights with an instruction whose 16-bit sums saturate at full range (ONNX Runtime's docs)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)


def _run(path: Path, names: tuple[str, str], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})[0])


def export_onnx(checkpoint: str | Path, out: str | Path, int8: bool = True, num_frames: int | None = None) -> dict:
    """Export the dual encoder of `checkpoint` into `out`; returns what export.json records.
    `num_frames`: frames per clip the exported video encoder reads (default: the model's; fewer frames
    cost proportionally less — the temporal position embedding is interpolated, as `evl eval --frames` does)."""
    import onnx
    import onnxruntime

    from evl.api import EXPORT_FILE, MAX_TEXT_LEN
    from evl.checkpoint import model_fingerprint, read_config
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} is not an evl checkpoint folder (no config.json)")
    if read_config(checkpoint).get("kind") == "frame_qa":
        raise ConfigError(f"{checkpoint} is a frame-QA model: only dual encoders are exported (its towers are a "
                          "copy of the backbone's: export that checkpoint instead)")
    if out.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {out} is the checkpoint folder itself; export into a new folder")
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ConfigError(f"--out {out} exists and holds files that are not an evl export; choose a new or empty folder")
    model = VideoLanguageModel.from_pretrained(checkpoint).eval()
    v = model.cfg.video
    num_frames = v.num_frames if num_frames is None else num_frames
    if num_frames < v.tubelet_size or num_frames % v.tubelet_size or num_frames > MAX_FRAMES:
        raise ConfigError(f"--frames {num_frames}: must be a multiple of the model's tubelet size ({v.tubelet_size}), "
                          f"at most {MAX_FRAMES}")
    tokenizer = tokenizer_for(model.cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / EXPORT_FILE, *out.glob("*.onnx")]:   # an earlier export here: nothing of it may stay
        old.unlink(missing_ok=True)
    video_in, text_in = _examples(model, 3, tokenizer, num_frames)
    texts = ["a cross", "the green star spins around and then the red box moves to the left side"]
    tok = tokenizer(texts, max_length=32)   # another batch size and text length than traced
    checks = {"video": tuple(x[:2] for x in video_in), "text": (tok.input_ids, tok.attention_mask)}
    graphs = {
        "video": (EncoderGraph(model, "encode_video").eval(), video_in, ("frames", "frame_mask"),
                  {"frames": {0: "batch"}, "frame_mask": {0: "batch"}, "embedding": {0: "batch"}}),
        "text": (EncoderGraph(model, "encode_text").eval(), text_in, ("input_ids", "attention_mask"),
                 {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                  "embedding": {0: "batch"}}),
    }
    parity: dict[str, dict[str, float]] = {}
    for name, (graph, inputs, names, axes) in graphs.items():
        path = out / f"{name}.onnx"
        with warnings.catch_warnings():   # shape checks traced as constants: only batch and length vary
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter: see the module doc
            torch.onnx.export(graph, inputs, str(path), input_names=list(names), output_names=["embedding"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        onnx.checker.check_model(str(path))
        check = checks[name]
        with torch.no_grad():
            ref = graph(*check).float()
        diff = float((_run(path, names, check) - ref).abs().max())
        if diff > FP32_TOLERANCE:
            raise CheckpointError(f"the exported {name} encoder differs from PyTorch by {diff:.2e} (> "
                                  f"{FP32_TOLERANCE}); the export is not usable — please report this with the checkpoint")
        parity[name] = {"fp32_max_abs_diff": diff}
        if int8:
            qpath = out / f"{name}.int8.onnx"
            _quantize(path, qpath, per_channel=name == "text")
            q = _run(qpath, names, check)
            parity[name].update(int8_max_abs_diff=float((q - ref).abs().max()),
                                int8_min_cosine=float(torch.nn.functional.cosine_similarity(q, ref).min()))
    for name in ("config.json", "tokenizer.json"):
        src = checkpoint / name if (checkpoint / name).is_file() else tokenizer.source / name
        shutil.copyfile(src, out / name)
    info = {"format": "onnx", "source": str(checkpoint.resolve()), "source_fingerprint": model_fingerprint(checkpoint),
            "num_frames": num_frames, "trained_num_frames": v.num_frames, "image_size": v.image_size, "max_text_len": MAX_TEXT_LEN,
            "embed_dim": model.cfg.embed_dim, "opset": OPSET, "int8": int8, "parity": parity,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
