"""The packed-kernel crossover is measured, not assumed: the rule over timings, and the cache."""

from __future__ import annotations

import pytest

from treebatch.layers.linear import ALL_ROWS, PACKED_MAX_ROWS
from treebatch.runtime import kernel_choice, machine_cache
from treebatch.runtime.kernel_choice import crossover


@pytest.fixture(autouse=True)
def steady_machine(monkeypatch):
    """A fixed pace: a stored measurement is taken again where the machine's pace has slowed
    since, and these tests' own probes and compilations must not make one look so."""
    monkeypatch.setattr(machine_cache, "pace", lambda repeats=5: 1e-3)
    monkeypatch.setattr(machine_cache, "_pace_now", [])


def test_crossover_is_the_last_size_packed_wins_from_the_start():
    assert crossover({48: (1.0, 2.0), 160: (1.0, 2.0), 512: (1.0, 2.0)}) == ALL_ROWS  # AMD EPYC: always
    assert crossover({48: (1.0, 2.0), 160: (3.0, 2.0), 512: (1.0, 2.0)}) == 48
    assert crossover({48: (3.0, 2.0), 160: (1.0, 2.0), 512: (1.0, 2.0)}) == PACKED_MAX_ROWS  # loses at once
    assert crossover({48: (1.05, 1.0), 160: (1.0, 1.0), 512: (1.08, 1.0)}) == ALL_ROWS  # a tie keeps one copy


def test_the_choice_is_measured_once_per_machine_and_shape(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path))
    calls = []

    def probe(dtype, in_features, out_features, repeats=3):
        calls.append((dtype, in_features, out_features))
        return {48: (1.0, 2.0), 160: (3.0, 2.0), 512: (3.0, 2.0)}

    monkeypatch.setattr(kernel_choice, "probe", probe)
    assert kernel_choice.packed_max_rows(torch.float32, 64, 128) == 48
    assert kernel_choice.packed_max_rows(torch.float32, 64, 128) == 48 and len(calls) == 1  # cached
    kernel_choice.packed_max_rows(torch.bfloat16, 64, 128)
    assert len(calls) == 2  # another dtype is another measurement


def test_the_probe_times_both_kernels():
    import torch

    timings = kernel_choice.probe(torch.float32, 32, 48, repeats=1)
    assert timings == {} or (set(timings) == set(kernel_choice.PROBE_ROWS)
                             and all(p > 0 and q > 0 for p, q in timings.values()))


def test_the_own_kernel_runs_up_to_where_it_stops_winning(monkeypatch, tmp_path):
    import torch

    from treebatch.layers import native

    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "gemm_available", lambda: True)
    monkeypatch.setattr(kernel_choice, "probe", lambda *a, **k: {48: (1.0, 2.0), 160: (1.0, 2.0), 512: (1.0, 2.0)})
    calls = []

    def probe_native(dtype, layer, packed, repeats=5):
        calls.append(packed)
        return {16: (1.0, 2.0), 48: (1.0, 2.0), 160: (3.0, 2.0), 512: (1.0, 2.0)}

    monkeypatch.setattr(kernel_choice, "probe_native", probe_native)
    choice = kernel_choice.choose(torch.float32, 64, 128)
    assert (choice.native_max_rows, choice.packed_max_rows) == (48, ALL_ROWS) and calls == [ALL_ROWS]
    assert kernel_choice.choose(torch.float32, 64, 128) == choice and len(calls) == 1  # cached
    assert crossover({16: (2.0, 1.0), 48: (1.0, 2.0)}, lost_at_once=0) == 0  # loses at once: never used
    # Ties count where they keep fewer copies of the weights: a tie at 16 rows beside a packed
    # kernel to 40 would keep three copies (own, packed, plain), none of it two.
    assert kernel_choice.own_rows({16: (1.05, 1.0), 48: (3.0, 1.0)}, 40) == 0
    won_then_tied = {16: (0.5, 1.0), 48: (0.95, 1.0), 160: (3.0, 1.0)}
    assert kernel_choice.own_rows(won_then_tied, 40) == 48  # past the packed kernel's 40: two copies, not three
    assert kernel_choice.own_rows(won_then_tied, ALL_ROWS) == 48  # two copies either way: the tie counts
    assert kernel_choice.own_rows({16: (1.05, 1.0), 48: (0.5, 1.0)}, 40) == ALL_ROWS  # one copy
    assert kernel_choice.own_rows({}, 40) == 0
    monkeypatch.setattr(kernel_choice, "probe_native", lambda *a, **k: {})  # disagreed with torch
    assert kernel_choice.choose(torch.bfloat16, 64, 128).native_max_rows == 0


def test_an_own_kernel_that_disagrees_with_torch_is_not_used(monkeypatch):
    import torch

    from treebatch.layers import native

    if not native.gemm_available():
        pytest.skip("kernels/gemm.c needs AVX2 and FMA here")
    timings = kernel_choice.probe_native(torch.float32, [(32, 48), (48, 32)], ALL_ROWS, repeats=1)
    assert set(timings) == set(kernel_choice.NATIVE_PROBE_ROWS) and all(p > 0 and q > 0 for p, q in timings.values())
    real = native.gemm
    monkeypatch.setattr(native, "gemm", lambda x, panels, n, bias: real(x, panels, n, bias) * 1.01)
    with pytest.warns(UserWarning, match="differs from torch"):
        assert kernel_choice.probe_native(torch.float32, [(32, 48)], ALL_ROWS, repeats=1) == {}


def test_the_matrix_unit_serves_bf16_attention_where_it_is_measured_faster(monkeypatch, tmp_path):
    """Where the CPU has AMX the faster of the two timed paths is kept (and cached); float32, and a
    CPU without the unit, never use it."""
    import torch

    from treebatch.layers import native

    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path))
    assert kernel_choice.attention_amx(torch.float32, 9, 3, 64) is False
    if not (native.chunk_attention_available(torch.bfloat16) and native.attention_amx(True)):
        assert kernel_choice.attention_amx(torch.bfloat16, 9, 3, 64) is False
        pytest.skip("needs AMX-BF16")
    seconds = kernel_choice.probe_amx(9, 3, 64, repeats=1)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    calls = []
    for timings, expected in [((1.0, 2.0), True), ((2.0, 1.0), False)]:
        monkeypatch.setattr(kernel_choice, "probe_amx", lambda *shape, t=timings: calls.append(shape) or t)
        assert kernel_choice.attention_amx(torch.bfloat16, 9, 3, 64 * (2 if expected else 4)) is expected
        assert native.attention_amx() is expected
        assert kernel_choice.attention_amx(torch.bfloat16, 9, 3, 64 * (2 if expected else 4)) is expected  # cached
    assert len(calls) == 2
    native.attention_amx(True)
