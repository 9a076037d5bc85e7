"""Linear projections on the CPU, each run by the kernel that is fastest for its number of rows.

A step's batch is as small as its decodes (a dozen rows) or as large as the token budget, and the
float32 GEMM kernels torch offers differ by up to 3x across that range (measured on 2 cores for
SmolLM2-135M's four projections, milliseconds per layer; see BENCHMARKS.md notes):

    rows            1     8    12    15    16    24    32    64   128
    x @ W^T       0.33  1.07  1.19  1.69  1.39  1.60  2.12  3.77  7.22
    W @ x^T       0.39  1.05  1.47  2.90  0.95  1.50  1.56  2.86  5.16
    oneDNN packed 0.37  0.57  0.73  0.86  0.97  1.28  1.69  3.07  6.00

For a 49,152-row vocabulary head the packed kernel is 2.3x faster at 12 rows and still ahead at
64. So: oneDNN's GEMM on a weight reordered once into its blocked layout for small batches, and MKL's
`W @ x^T` for larger ones, with the rows padded to a multiple of 16, the width its kernel runs
at full speed (15 rows take three times as long as 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Up to this many rows the packed oneDNN kernel is the fastest (measured crossover 40-48 rows).
PACKED_MAX_ROWS = 40
HEAD_PACKED_MAX_ROWS = 128
# From here on x @ W^T (F.linear) is as fast as the transposed form and needs no padding.
LARGE_BATCH_ROWS = 256
_ROW_MULTIPLE = 16


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """y = x @ weight^T (+ bias) for x: [rows, in_features]; the result may be a strided view."""

    __slots__ = ("weight", "bias", "packed", "packed_max_rows")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        pack: bool = True,
        packed_max_rows: int = PACKED_MAX_ROWS,
    ) -> None:
        """`packed_max_rows`: batches up to this size take the packed kernel (a wide output, like a
        vocabulary head, gains from it up to larger batches)."""
        self.weight = weight.contiguous()
        self.bias = bias
        self.packed_max_rows = packed_max_rows
        self.packed: torch.Tensor | None = None
        if pack and weight.dtype == torch.float32 and weight.device.type == "cpu" and _packing_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.packed is not None and 0 < rows <= self.packed_max_rows:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        if rows >= LARGE_BATCH_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        return self.transposed(x)

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        """(W @ x^T)^T with x padded with zero rows to a multiple of 16: the slow path's fast twin."""
        rows = x.shape[0]
        padded_rows = -(-rows // _ROW_MULTIPLE) * _ROW_MULTIPLE
        if padded_rows != rows:
            x = torch.cat([x, x.new_zeros(padded_rows - rows, x.shape[1])])
        out = torch.matmul(self.weight, x.t()).t()[:rows]
        return out if self.bias is None else out + self.bias

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain form every kernel choice must equal (to float32 rounding)."""
        return F.linear(x, self.weight, self.bias)
