"""Precision is chosen from what the hardware runs natively.

These tests fake the hardware (cpuinfo text, the CPU verdict, CUDA's bf16 support) so that every
branch is checked on any machine, and never allocate on a GPU: there may be none.
"""

import math

import pytest
import torch

from evl import precision as P
from evl.errors import ConfigError

AMD_EPYC_AVX2_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx \
fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc \
cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt \
aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch \
osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed \
adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr rdpru arat npt nrip_save \
umip vaes vpclmulqdq rdpid fsrm

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse avx avx2 fma
"""

INTEL_SAPPHIRE_RAPIDS_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr \
sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid \
tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c \
rdrand hypervisor lahf_lm abm 3dnowprefetch ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust \
bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb \
avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat \
avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg \
avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 \
avx512_fp16 amx_tile amx_int8 arch_capabilities
"""


@pytest.fixture(autouse=True)
def _no_precision_from_env(monkeypatch):
    """These tests check what auto resolves to; the suite may run under EVL_PRECISION (tests that set it say so)."""
    monkeypatch.delenv(P.ENV_VAR, raising=False)


def _fake_cpu(monkeypatch, flags_bf16, capability="AVX2"):
    """Replace cpu_info() (cached, reads the real machine) with a fixed answer."""
    info = {"model": "fake", "vendor": "fake", "capability": capability,
            "flags_bf16": flags_bf16, "cores": 2, "torch": torch.__version__}
    monkeypatch.setattr(P, "cpu_info", lambda: info)


# --- flag parsing -------------------------------------------------------------------------------

def test_amd_avx2_only_cpu_has_no_bf16_flags():
    assert P.bf16_flags(AMD_EPYC_AVX2_CPUINFO) == []


def test_intel_sapphire_rapids_has_amx_and_avx512_bf16():
    flags = P.bf16_flags(INTEL_SAPPHIRE_RAPIDS_CPUINFO)
    assert set(flags) == {"amx_bf16", "amx_tile", "avx512_bf16"}


def test_flag_parsing_needs_whole_words():
    # avx512_bf16 must not be found inside a longer, unrelated flag name
    text = "flags\t: avx2 avx512_bf16x amx_bf16_fake\n"
    assert P.bf16_flags(text) == []


def test_text_without_flags_line_has_no_bf16_flags():
    assert P.bf16_flags("processor\t: 0\nmodel name\t: something\n") == []


# --- cpu_info -----------------------------------------------------------------------------------

def test_cpu_info_fields():
    info = P.cpu_info()
    assert set(info) == {"model", "vendor", "capability", "flags_bf16", "cores", "torch"}
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch"] == torch.__version__
    assert info["flags_bf16"] is None or set(info["flags_bf16"]) <= {"amx_bf16", "amx_tile", "avx512_bf16"}
    assert isinstance(info["model"], str) and info["model"]
    assert P.cpu_info() is info  # cached: the second call does no work


# --- cpu_runs_bf16_natively ---------------------------------------------------------------------

def test_cpu_with_amx_runs_bf16_natively(monkeypatch):
    _fake_cpu(monkeypatch, ["amx_bf16", "amx_tile"], capability="AVX512")
    native, why = P.cpu_runs_bf16_natively()
    assert native
    assert "amx_bf16" in why


def test_cpu_with_avx512_bf16_runs_bf16_natively(monkeypatch):
    _fake_cpu(monkeypatch, ["avx512_bf16"], capability="AVX512")
    native, why = P.cpu_runs_bf16_natively()
    assert native
    assert "avx512_bf16" in why


def test_amx_tile_alone_is_not_bf16(monkeypatch):
    _fake_cpu(monkeypatch, ["amx_tile"], capability="AVX512")
    native, _ = P.cpu_runs_bf16_natively()
    assert not native


def test_avx2_cpu_emulates_bf16(monkeypatch):
    _fake_cpu(monkeypatch, [])
    native, why = P.cpu_runs_bf16_natively()
    assert not native
    assert "AVX2" in why and "emulated" in why


def test_unreadable_flags_without_probe_is_not_native(monkeypatch):
    _fake_cpu(monkeypatch, None)
    monkeypatch.setattr(P, "_probe_bf16_ratio", lambda: pytest.fail("probe=False must not time anything"))
    native, why = P.cpu_runs_bf16_natively(probe=False)
    assert not native
    assert why


@pytest.mark.parametrize("ratio, expected", [(0.01, False), (0.49, False), (0.5, True), (2.0, True)])
def test_unreadable_flags_probe_decides(monkeypatch, ratio, expected):
    _fake_cpu(monkeypatch, None)
    monkeypatch.setattr(P, "_probe_bf16_ratio", lambda: ratio)
    native, why = P.cpu_runs_bf16_natively(probe=True)
    assert native is expected
    assert f"{ratio:.2f}" in why


# --- resolve_precision --------------------------------------------------------------------------

def test_explicit_fp32_is_always_fp32(monkeypatch):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (True, "native"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for device in ("cpu", torch.device("cuda")):
        p = P.resolve_precision("fp32", device)
        assert p.name == "fp32"
        assert p.autocast_dtype is None


def test_explicit_bf16_on_native_cpu(monkeypatch):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (True, "CPU flags: amx_bf16"))
    p = P.resolve_precision("bf16", "cpu")
    assert p.name == "bf16"
    assert p.autocast_dtype is torch.bfloat16


def test_explicit_bf16_on_emulating_cpu_is_honoured_with_a_warning(monkeypatch):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively",
                        lambda probe=True: (False, "AVX2 CPU without AVX512-BF16/AMX: bf16 matmul is emulated"))
    p = P.resolve_precision("bf16", torch.device("cpu"))
    assert p.name == "bf16"
    assert p.autocast_dtype is torch.bfloat16
    assert "slow" in p.reason
    assert "emulated" in p.reason


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (native, "because"))
    p = P.resolve_precision("auto", "cpu")
    assert p.name == expected
    assert p.autocast_dtype == (torch.bfloat16 if native else None)
    assert "because" in p.reason


@pytest.mark.parametrize("requested", ["auto", "bf16"])
def test_cuda_with_bf16(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: pytest.fail("CPU is irrelevant on CUDA"))
    p = P.resolve_precision(requested, torch.device("cuda"))
    assert p.name == "bf16"
    assert p.autocast_dtype is torch.bfloat16


@pytest.mark.parametrize("requested", ["auto", "bf16"])
def test_cuda_without_bf16_falls_back_to_fp32(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = P.resolve_precision(requested, torch.device("cuda", 0))
    assert p.name == "fp32"
    assert p.autocast_dtype is None
    assert "bf16" in p.reason
    if requested == "bf16":
        assert "requested" in p.reason


@pytest.mark.parametrize("bad", ["fp16", "BF16", "float32", ""])
def test_bad_requested_value_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="train.precision") as err:
        P.resolve_precision(bad, "cpu")
    message = str(err.value)
    for valid in ("auto", "fp32", "bf16"):
        assert valid in message


def test_precision_is_frozen():
    p = P.resolve_precision("fp32", "cpu")
    with pytest.raises(AttributeError):
        p.name = "bf16"


# --- measure_matmul_gflops ----------------------------------------------------------------------

def test_measure_matmul_gflops_fp32_is_positive_and_finite():
    gflops = P.measure_matmul_gflops(torch.float32, n=64, repeats=3)
    assert gflops > 0
    assert math.isfinite(gflops)


# --- auto from injected /proc/cpuinfo text (the whole path: text → flags → verdict → precision) ----

@pytest.fixture
def cpuinfo_text(monkeypatch):
    """Inject a /proc/cpuinfo text (None = unreadable) and clear the cached cpu_info()."""
    def inject(text):
        monkeypatch.setattr(P, "_cpuinfo_text", lambda: text)
        P.cpu_info.cache_clear()

    yield inject
    P.cpu_info.cache_clear()


def test_auto_is_bf16_on_an_amx_cpu(cpuinfo_text):
    cpuinfo_text(INTEL_SAPPHIRE_RAPIDS_CPUINFO)
    p = P.resolve_precision("auto", "cpu")
    assert (p.name, p.autocast_dtype) == ("bf16", torch.bfloat16)
    assert "amx_bf16" in p.reason


def test_auto_is_fp32_on_an_avx2_cpu(cpuinfo_text, monkeypatch):
    cpuinfo_text(AMD_EPYC_AVX2_CPUINFO)
    monkeypatch.setattr(P, "_probe_bf16_ratio", lambda: pytest.fail("readable flags must decide, not a probe"))
    p = P.resolve_precision("auto", "cpu")
    assert (p.name, p.autocast_dtype) == ("fp32", None)
    assert "emulated" in p.reason


@pytest.mark.parametrize("ratio, expected", [(0.02, "fp32"), (1.9, "bf16")])
def test_auto_with_unreadable_cpuinfo_asks_the_probe(cpuinfo_text, monkeypatch, ratio, expected):
    cpuinfo_text(None)
    monkeypatch.setattr(P, "_probe_bf16_ratio", lambda: ratio)
    assert P.resolve_precision("auto", "cpu").name == expected


# --- EVL_PRECISION: what auto means for the whole process (the suite's precision switch) -----------

@pytest.mark.parametrize("forced", ["fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False])
def test_env_decides_what_auto_means(monkeypatch, forced, native):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (native, "because"))
    monkeypatch.setenv(P.ENV_VAR, forced)
    p = P.resolve_precision("auto", "cpu")
    assert p.name == forced
    assert p.autocast_dtype == (torch.bfloat16 if forced == "bf16" else None)
    assert f"{P.ENV_VAR}={forced}" in p.reason


@pytest.mark.parametrize("value", ["", "auto"])
def test_env_unset_or_auto_leaves_auto_to_the_hardware(monkeypatch, value):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (True, "because"))
    monkeypatch.setenv(P.ENV_VAR, value)
    assert P.resolve_precision("auto", "cpu").name == "bf16"


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_env_never_overrides_an_explicit_precision(monkeypatch, requested):
    monkeypatch.setattr(P, "cpu_runs_bf16_natively", lambda probe=True: (True, "because"))
    monkeypatch.setenv(P.ENV_VAR, "bf16" if requested == "fp32" else "fp32")
    assert P.resolve_precision(requested, "cpu").name == requested


def test_bad_env_value_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "half")
    with pytest.raises(ConfigError, match="EVL_PRECISION='half'"):
        P.resolve_precision("auto", "cpu")
