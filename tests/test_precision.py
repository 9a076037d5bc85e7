"""dtype="auto": bfloat16 only where the CPU has bf16 instructions and they measure faster."""

from __future__ import annotations

import pytest

from treebatch.runtime import precision


def test_forcing_float32_cpu_makes_auto_float32(monkeypatch):
    monkeypatch.setenv("TREEBATCH_FORCE_FP32_CPU", "1")
    monkeypatch.setattr(precision, "bf16_speedup", lambda: pytest.fail("no measurement without bf16 units"))
    assert not precision.native_bf16()
    assert precision.resolve_dtype("auto") == "float32"
    assert precision.resolve_dtype("bfloat16") == "bfloat16"  # an explicit choice is kept


@pytest.mark.parametrize(
    "flags,speedup,expected",
    [
        ("fpu sse avx2 avx512f", 3.0, "float32"),  # no bf16 instructions: no measurement either
        ("fpu avx512f avx512_bf16", 3.0, "bfloat16"),
        ("fpu amx_bf16 amx_tile", 2.0, "bfloat16"),
        ("fpu avx512_bf16", 1.1, "float32"),  # flags, but not faster here (an emulating VM)
    ],
)
def test_auto_follows_flags_and_the_measurement(monkeypatch, flags, speedup, expected):
    monkeypatch.delenv("TREEBATCH_FORCE_FP32_CPU", raising=False)
    monkeypatch.setattr(precision, "cpuinfo_field", lambda *names: flags)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: speedup)
    assert precision.resolve_dtype("auto") == expected
    assert precision.resolve_dtype("float32") == "float32"


def test_the_measurement_is_cached(monkeypatch, tmp_path):
    from treebatch.runtime import machine_cache

    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path))
    # A steady pace: a stored measurement is taken again where the machine has slowed since (here,
    # another process on the cores would make it look so).
    monkeypatch.setattr(machine_cache, "pace", lambda repeats=5: 1e-3)
    monkeypatch.setattr(machine_cache, "_pace_now", [])
    calls = []

    def probe(dtype, repeats=3):
        calls.append(dtype)
        return 2.0 if len(calls) == 1 else 1.0  # float32 first, then bfloat16

    monkeypatch.setattr(precision, "_probe_seconds", probe)
    assert precision.bf16_speedup() == 2.0 and len(calls) == 2
    assert precision.bf16_speedup() == 2.0 and len(calls) == 2  # read back, not measured again
    assert list((tmp_path / "calibration").glob("precision-*.json"))
