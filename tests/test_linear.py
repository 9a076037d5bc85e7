import pytest
import torch

from treebatch.layers.linear import LARGE_BATCH_ROWS, PACKED_MAX_ROWS, Linear

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
        torch.testing.assert_close(got, linear.reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear.transposed(x), linear.reference(x), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_empty_batch() -> None:
    torch.manual_seed(1)
    linear = Linear(torch.randn(32, 48))
    x = torch.randn(48, 10).t()  # a transposed view
    torch.testing.assert_close(linear(x), linear.reference(x.contiguous()), rtol=1e-5, atol=1e-5)
    assert linear(torch.empty(0, 48)).shape == (0, 32)


def test_only_float32_cpu_weights_are_packed() -> None:
    half = Linear(torch.randn(16, 16, dtype=torch.bfloat16))
    assert half.packed is None
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(half(x), half.reference(x))
    assert Linear(torch.randn(16, 16), pack=False).packed is None
