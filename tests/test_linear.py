import pytest
import torch

from treebatch.layers import native
from treebatch.layers.linear import ALL_ROWS, LARGE_BATCH_ROWS, PACKED_MAX_ROWS, KernelChoice, Linear

ROWS = [1, 2, 7, 12, 15, 16, 17, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 47, 48, 100, 128, LARGE_BATCH_ROWS - 1, LARGE_BATCH_ROWS, 300]


@pytest.mark.parametrize("with_bias", [False, True])
def test_every_kernel_choice_equals_the_plain_projection(with_bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    bias = torch.randn(96) if with_bias else None
    linear = Linear(weight, bias)
    for rows in ROWS:
        x = torch.randn(rows, 64)
        got = linear(x)
        assert got.shape == (rows, 96)
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear.transposed(x), expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_empty_batch() -> None:
    torch.manual_seed(1)
    weight = torch.randn(32, 48)
    linear = Linear(weight)
    x = torch.randn(48, 10).t()  # a transposed view
    torch.testing.assert_close(linear(x), x @ weight.t(), rtol=1e-5, atol=1e-5)
    assert linear(torch.empty(0, 48)).shape == (0, 32)


def test_packed_for_every_batch_keeps_one_copy_and_equals_the_plain_projection() -> None:
    torch.manual_seed(3)
    weight = torch.randn(96, 64)
    linear = Linear(weight, packed_max_rows=ALL_ROWS)
    if linear.packed is None:
        pytest.skip("no oneDNN packing in this torch build")
    assert linear.weight is None
    for rows in ROWS:
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear(x), x @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_weights_are_packed_once_and_equal_the_plain_projection(with_bias: bool) -> None:
    """The packed bf16 kernel multiplies bf16 values exactly and sums in float32, as F.linear's
    bf16 kernel does; the two differ by the order of the float32 sums and by rounding the result
    to bf16 (relative 2^-8 each), so they agree to rtol 1.6e-2 (two bf16 ulps)."""
    torch.manual_seed(2)
    weight = torch.randn(96, 64).bfloat16()
    bias = torch.randn(96).bfloat16() if with_bias else None
    linear = Linear(weight, bias, packed_max_rows=ALL_ROWS)
    if linear.packed is None:
        pytest.skip("no oneDNN packing in this torch build")
    assert linear.weight is None  # the packed form is the only copy
    for rows in ROWS:
        x = torch.randn(rows, 64).bfloat16()
        expected = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        torch.testing.assert_close(linear(x).float(), expected, rtol=1.6e-2, atol=1.6e-2)
    assert linear(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 96)


def test_other_weights_are_not_packed() -> None:
    half = Linear(torch.randn(16, 16, dtype=torch.float16))
    assert half.packed is None
    x = torch.randn(3, 16, dtype=torch.float16)
    torch.testing.assert_close(half(x), x @ half.weight.t())
    assert Linear(torch.randn(16, 16), pack=False).packed is None


needs_gemm = pytest.mark.skipif(not native.gemm_available(), reason="kernels/gemm.c needs AVX2 and FMA here")


@needs_gemm
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (61, 1536), (1000, 24)])
def test_the_own_kernel_equals_the_plain_projection_in_float32(shape: tuple[int, int], with_bias: bool) -> None:
    """Panels of 16 features (61 and 1000 leave a partial last panel), tiles of 1-6 rows, and
    for K = 1536 chunks of 252 rows (two for 300 rows). Float32 sums in another
    order: equal to 1e-5 of the outputs' scale, which grows as sqrt(K) for these weights."""
    torch.manual_seed(4)
    weight = torch.randn(*shape)
    bias = torch.randn(shape[0]) if with_bias else None
    linear = Linear(weight, bias, native_max_rows=ALL_ROWS)
    assert linear.weight is None and linear.packed is None  # the panels are the only copy
    for rows in ROWS:
        x = torch.randn(rows, shape[1])
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5 * shape[1] ** 0.5)


@needs_gemm
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_own_kernel_in_bf16_sums_in_float32_and_rounds_once(with_bias: bool) -> None:
    """bf16 weights and inputs widened exactly, float32 sums, one rounding to bf16 at the end
    (to nearest even): equal to the float32 product of the same bf16 values rounded once, up to
    one bf16 ulp where the float32 sums' order moves a value across a rounding boundary."""
    torch.manual_seed(5)
    weight = torch.randn(70, 200).bfloat16()
    bias = torch.randn(70).bfloat16() if with_bias else None
    linear = Linear(weight, bias, native_max_rows=ALL_ROWS)
    for rows in ROWS:
        x = torch.randn(rows, 200).bfloat16()
        expected = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        got = linear(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.bfloat16().float(), rtol=2 ** -7, atol=1e-3)
    x = torch.randn(5, 200)
    if linear.panels.dim() == 4:  # AVX512-BF16's pair panels multiply bfloat16 by bfloat16 only
        with pytest.raises(ValueError, match="bfloat16 x"):
            native.gemm(x, linear.panels, 70, linear.panel_bias)
        return
    # float32 inputs against bf16 panels: the result in the input's dtype
    expected = torch.nn.functional.linear(x, weight.float(), None if bias is None else bias.float())
    torch.testing.assert_close(native.gemm(x, linear.panels, 70, linear.panel_bias), expected, rtol=1e-5, atol=1e-4)


@needs_gemm
def test_float32_out_keeps_the_own_kernels_sums_and_converts_the_others() -> None:
    """A bf16 projection's float32 output (the logits): the own kernel's float32 sums, unrounded,
    for the batches it serves; the other kernels' bf16 results widened for the rest."""
    torch.manual_seed(9)
    weight = torch.randn(70, 200).bfloat16()
    linear = Linear(weight, packed_max_rows=64, native_max_rows=16)
    for rows in (1, 16, 17, 80):
        x = torch.randn(rows, 200).bfloat16()
        got = linear.float32_out(x)
        expected = x.float() @ weight.float().t()
        assert got.dtype == torch.float32
        if rows <= 16:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        else:
            assert torch.equal(got, linear(x).float())
    assert linear.float32_out(torch.empty(0, 200).bfloat16()).shape == (0, 70)


@pytest.mark.skipif(not native.gemm_pairs_available(), reason="the pair path needs AVX512-BF16")
@pytest.mark.parametrize("shape,all_rows", [((70, 201), range(1, 20)), ((32, 2), range(1, 20)), ((97, 1), range(1, 20)),
                                            ((40, 4099), (1, 9, 263))])
def test_the_pair_kernel_pads_odd_k_and_partial_panels(shape: tuple[int, int], all_rows) -> None:
    """Pair panels of 32 features by pairs of k: an odd K's last pair and a partial last panel
    are zero-padded, and every tile height (1 to 8 rows, and more tiles) is summed in float32
    and rounded once; a K past 2,048 goes in blocks whose sums carry over in float32 (with more
    rows than one chunk of them)."""
    torch.manual_seed(7)
    weight = torch.randn(*shape).bfloat16()
    panels = native.pack_panels(weight)
    assert panels.shape == (-(-shape[0] // 32), -(-shape[1] // 2), 32, 2)
    for rows in all_rows:
        x = torch.randn(rows, shape[1]).bfloat16()
        expected = (x.float() @ weight.float().t()).bfloat16().float()
        torch.testing.assert_close(native.gemm(x, panels, shape[0], None).float(), expected, rtol=2 ** -7, atol=1e-3)


@pytest.mark.skipif(not native.gemm_pairs_available(), reason="the pair path needs AVX512-BF16")
@pytest.mark.parametrize("shape", [(70, 64), (96, 576), (33, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_pair_kernel_with_k_a_multiple_of_32(shape: tuple[int, int], with_bias: bool) -> None:
    """A K of whole 32s goes through the AMX matrix unit where the CPU has it (gemm_pairs_amx):
    blocks of 32 rows x 32 features, a last block of one to 31 rows (a partial sixteen read from a
    zero-padded copy) and a partial last panel, summed in float32 and rounded once, + bias; the
    float32 output keeps the sums."""
    torch.manual_seed(shape[1])
    weight = torch.randn(*shape).bfloat16()
    bias = torch.randn(shape[0]) if with_bias else None
    panels = native.pack_panels(weight)
    for rows in (1, 3, 15, 16, 17, 31, 32, 33, 48, 63, 100):
        x = torch.randn(rows, shape[1]).bfloat16()
        exact = x.float() @ weight.float().t() + (0 if bias is None else bias)
        torch.testing.assert_close(native.gemm(x, panels, shape[0], bias).float(), exact.bfloat16().float(),
                                   rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(native.gemm(x, panels, shape[0], bias, out_dtype=torch.float32), exact,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("intermediate,hidden", [(64, 64), (96, 576), (40, 96)])
def test_the_gated_activation_in_the_epilogue_equals_it_apart(dtype, intermediate: int, hidden: int) -> None:
    """silu(gate) * up of a [gate; up] projection: where the own kernel takes it into the GEMM's
    epilogue (AMX, I and K multiples of 32) from the float32 sums, rounded once, it is at least as
    close to the float32 product as the projection and activation apart (each rounded to
    bfloat16); elsewhere (float32, an I of 40, no AMX, a batch another kernel serves) it is the
    two apart."""
    torch.manual_seed(intermediate + hidden)
    weight = (torch.randn(2 * intermediate, hidden) * 0.1).to(dtype)
    for linear in (Linear(weight, native_max_rows=ALL_ROWS), Linear(weight, native_max_rows=16)):
        for rows in (1, 16, 17, 40):
            x = torch.randn(rows, hidden).to(dtype)
            gate_up = x.float() @ weight.float().t()
            exact = torch.nn.functional.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
            got, apart = linear.silu_gated(x), native.silu_mul(linear(x))
            assert got.dtype == dtype and got.shape == (rows, intermediate)
            if dtype == torch.float32 or linear.panels is None or rows > linear.native_max_rows:
                assert torch.equal(got, apart)
                continue
            error, error_apart = (got.float() - exact).abs().max(), (apart.float() - exact).abs().max()
            assert error <= error_apart * 1.01 + 1e-6
            torch.testing.assert_close(got.float(), exact, rtol=2 ** -7, atol=2e-3)


@needs_gemm
def test_the_own_kernel_serves_small_batches_and_the_others_the_rest() -> None:
    torch.manual_seed(6)
    weight = torch.randn(48, 32)
    linear = Linear(weight, packed_max_rows=64, native_max_rows=16)
    assert linear.panels is not None and linear.weight is not None  # two kernels, their two copies
    for rows in (1, 16, 17, 64, 65, 300):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(linear(x), x @ weight.t(), rtol=1e-5, atol=1e-5)
    assert linear(torch.empty(0, 32)).shape == (0, 48)


def test_kernel_choice_counts_a_copy_per_kernel_in_use() -> None:
    assert KernelChoice(packed_max_rows=ALL_ROWS).copies == 1
    assert KernelChoice(packed_max_rows=48).copies == 2
    assert KernelChoice(packed_max_rows=ALL_ROWS, native_max_rows=ALL_ROWS).copies == 1
    assert KernelChoice(packed_max_rows=ALL_ROWS, native_max_rows=160).copies == 2
    assert KernelChoice(packed_max_rows=48, native_max_rows=160).copies == 2  # native, then plain
    assert KernelChoice(packed_max_rows=160, native_max_rows=48).copies == 3
