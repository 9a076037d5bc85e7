import pytest
import torch

from treebatch.layers.linear import ALL_ROWS, LARGE_BATCH_ROWS, PACKED_MAX_ROWS, Linear

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
