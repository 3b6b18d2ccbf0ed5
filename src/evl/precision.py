"""Training precision from what the hardware runs natively, and the facts to print beside a timing.

On an Intel CPU with AMX (or AVX512-BF16) a bf16 matmul runs about twice as fast as fp32; on a CPU
without AVX512-BF16/AMX bf16 is emulated and runs *slower*: ~100-150x on AVX2 only (e.g. AMD EPYC
before Zen 4; measured 0.9 vs 130 GFLOP/s), ~6x on AVX512 without bf16 (54 vs 316 GFLOP/s).
So `train.precision: auto` picks bf16 only where it is native: a CUDA GPU with bf16, or a CPU whose
flags show AMX-BF16 / AVX512-BF16; when the flags cannot be read (not Linux) a short timing probe decides. fp16 is never chosen: it is unusable on CPU.

`EVL_PRECISION=fp32|bf16` in the environment decides what `auto` resolves to, for every run of the
process and its children (torchrun workers inherit it): it is how the test suite is run under a chosen
precision (`EVL_PRECISION=bf16 make test`) and how a user forces one precision on all recipes without
editing them. An explicit `train.precision: fp32` / `bf16` in a config is never overridden.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evl.errors import ConfigError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PRECISIONS = ("auto", "fp32", "bf16")
ENV_VAR = "EVL_PRECISION"


@dataclass(frozen=True)
class Precision:
    name: str                              # "fp32" | "bf16"
    autocast_dtype: torch.dtype | None     # None = no autocast
    reason: str


def _cpuinfo_text() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpuinfo_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def bf16_flags(cpuinfo_text: str) -> list[str]:
    """The bf16-relevant flags (amx_bf16, amx_tile, avx512_bf16) in a /proc/cpuinfo text."""
    flags = set((_cpuinfo_field(cpuinfo_text, "flags") or "").split())
    return [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f in flags]


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model, vendor, torch's SIMD capability, bf16 flags (None when unreadable), cores, torch."""
    text = _cpuinfo_text()
    return {
        "model": (_cpuinfo_field(text, "model name") if text else None) or platform.processor() or "unknown",
        "vendor": (_cpuinfo_field(text, "vendor_id") if text else None) or "unknown",
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags_bf16": bf16_flags(text) if text else None,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def _median_seconds(fn, repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Measured matmul throughput (GFLOP/s, 2·n³ per product, median of `repeats` after a warm-up):
    the machine's peak that a benchmark's achieved GFLOP/s is compared with. On a CPU that emulates
    bf16, n=1024 takes ~2 s a product; pass a smaller n there."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run() -> None:
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / _median_seconds(run, repeats) / 1e9


@functools.lru_cache(maxsize=1)
def _probe_bf16_ratio() -> float:
    """bf16 / fp32 matmul speed on this CPU (256², a few repeats: well under half a second)."""
    return measure_matmul_gflops(torch.bfloat16, 256, 3) / measure_matmul_gflops(torch.float32, 256, 3)


def cpu_runs_bf16_natively(probe: bool = True) -> tuple[bool, str]:
    """(native?, why). Flags decide on Linux; elsewhere a timing probe (bf16 at least half as fast)."""
    flags = cpu_info()["flags_bf16"]
    cap = cpu_info()["capability"]
    if flags is not None:
        native = [f for f in BF16_FLAGS if f in flags]
        if native:
            return True, f"CPU flags: {', '.join(native)}"
        return False, (f"{cap} CPU without AVX512-BF16/AMX: bf16 matmul is emulated "
                       "(slower than fp32: ~6x measured on AVX512, ~100-150x on AVX2)")
    if not probe:
        return False, "CPU flags unreadable and no probe: fp32 is the safe choice"
    ratio = _probe_bf16_ratio()
    return ratio >= 0.5, f"timing probe: bf16 matmul at {ratio:.2f}x fp32 speed"


def precision_from_env() -> str | None:
    """The precision `EVL_PRECISION` asks `auto` to take ("fp32" | "bf16"), or None when unset/"auto"."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("fp32", "bf16"):
        raise ConfigError(f"environment variable {ENV_VAR}={value!r} is not one of ['auto', 'fp32', 'bf16']; "
                          f"unset it or set it to fp32 or bf16")
    return value


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """The training precision for `requested` ("auto", "fp32", "bf16") on `device`."""
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision: {requested!r} is not one of {list(PRECISIONS)} "
                          "(auto = bf16 only where the hardware runs it natively)")
    device = torch.device(device)
    forced = precision_from_env() if requested == "auto" else None
    if forced:   # the environment decides what auto means; explicit requests in a config are kept
        chosen = resolve_precision(forced, device)
        return Precision(chosen.name, chosen.autocast_dtype, f"auto: {ENV_VAR}={forced} in the environment; {chosen.reason}")
    if requested == "fp32":
        return Precision("fp32", None, "requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "CUDA device with bf16" + (" (auto)" if requested == "auto" else ""))
        return Precision("fp32", None, "this GPU has no bf16; fp32" + (" instead of the requested bf16" if requested == "bf16" else ""))
    native, why = cpu_runs_bf16_natively()
    if requested == "auto":
        return Precision("bf16", torch.bfloat16, f"auto: {why}") if native else Precision("fp32", None, f"auto: {why}")
    if native:
        return Precision("bf16", torch.bfloat16, f"requested; {why}")
    return Precision("bf16", torch.bfloat16, f"requested, but {why}: expect training to be very slow; "
                                             "use train.precision=auto or fp32")
