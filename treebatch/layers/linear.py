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

In bfloat16 the packed oneDNN kernel (AVX512-BF16 or AMX tiles, whichever the CPU has) is the
fastest at every row count (AMD EPYC with AVX512-BF16, SmolLM2-135M's fused gate/up, ms):

    rows             1     8    16    32    64   128   256   512
    F.linear bf16  0.38  0.65  0.54  4.73  3.81  5.88  6.53  9.45
    W @ x^T bf16   0.38  0.46  0.66  2.07  1.16  4.35  4.55 11.2
    oneDNN packed  0.30  0.35  0.47  0.71  0.99  2.27  4.16  9.04
    (float32 best  0.09  0.38  1.06  1.21  2.34  5.52 11.2  19.6)

so a bfloat16 weight is kept in its packed form only: one copy of it in memory, not two.

A third kernel is treebatch's own (kernels/gemm.c: weights in 16-feature panels, a 6 x 16 tile
of FMAs in registers). Where oneDNN's kernels run at a fraction of the machine's peak for small
batches, it leads (AMD EPYC with AVX2 only, float32, ms; SmolLM2-135M's projections and head):

    rows                 1     16     48    160    512
    gate/up  oneDNN   0.34   1.09   2.78   8.14   25.7
             own      0.22   1.00   2.49   8.19   26.2
    down     oneDNN   0.15   0.62   1.84   4.36   13.2
             own      0.08   0.41   1.24   4.02   12.5
    head     oneDNN   6.43   17.6   40.1    126      -
             own      5.28   15.2   39.7    129      -

and it runs bfloat16 weights (widened in registers, summed in float32) at 55 GFLOP/s on a CPU
where torch's bfloat16 GEMM is emulated (0.2 GFLOP/s). On a CPU with AVX512-BF16 it multiplies
bfloat16 by pairs of k with the bf16 dot-product instruction, 1.2-1.6x oneDNN's speed at 16 rows
and even from 256 (AMD EPYC, benchmarks/kernel_speed.py).

Where the packed kernel wins depends on the CPU's GEMM libraries (on AMD EPYC MKL's float32
GEMM trails oneDNN's at every size, while on the Intel Xeon of the first table it leads from 48
rows), so the engine measures the crossover at start-up (runtime/kernel_choice.py) and passes
it as `packed_max_rows`; from ALL_ROWS on the plain copy is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treebatch.layers import native

# Up to this many rows the packed oneDNN kernel is the fastest (measured crossover 40-48 rows).
PACKED_MAX_ROWS = 40
HEAD_PACKED_MAX_ROWS = 128
# From here on x @ W^T (F.linear) is as fast as the transposed form and needs no padding.
LARGE_BATCH_ROWS = 256
_ROW_MULTIPLE = 16
ALL_ROWS = 1 << 62  # packed_max_rows meaning every batch: the weight is kept packed only


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """Which kernel serves a projection at which batch size (runtime/kernel_choice.py measures it
    on this CPU): up to `native_max_rows` rows treebatch's own, then up to `packed_max_rows`
    oneDNN's packed kernel, beyond that torch's GEMM on the plain weight."""

    packed_max_rows: int = PACKED_MAX_ROWS
    native_max_rows: int = 0

    @property
    def copies(self) -> int:
        """Copies of each weight the kernels keep: one per kernel in use."""
        native_used = self.native_max_rows > 0
        packed_used = self.packed_max_rows > self.native_max_rows
        plain_used = self.native_max_rows < ALL_ROWS and self.packed_max_rows < ALL_ROWS
        return max(1, native_used + packed_used + plain_used)


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """y = x @ weight^T (+ bias) for x: [rows, in_features]; the result may be a strided view."""

    __slots__ = ("weight", "bias", "packed", "packed_max_rows", "panels", "panel_bias", "native_max_rows",
                 "out_features", "in_features", "dtype")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        pack: bool = True,
        packed_max_rows: int = PACKED_MAX_ROWS,
        native_max_rows: int = 0,
    ) -> None:
        """`native_max_rows`: batches up to this size take kernels/gemm.c (where it built);
        `packed_max_rows`: then up to this size the packed oneDNN kernel; ALL_ROWS in either: every
        batch does, and only that kernel's form of the weight is kept (`weight` is None)."""
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.weight: torch.Tensor | None = weight.contiguous()
        self.bias = bias
        self.packed_max_rows = packed_max_rows
        self.packed: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None
        self.panel_bias: torch.Tensor | None = None
        packable = pack and weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu"
        self.native_max_rows = native_max_rows if packable and native_max_rows > 0 and native.gemm_available() else 0
        if self.native_max_rows:
            self.panels = native.pack_panels(self.weight)
            self.panel_bias = None if bias is None else bias.float().contiguous()
            if native_max_rows >= ALL_ROWS:
                self.weight = None
                return
        if packable and _packing_available() and packed_max_rows > self.native_max_rows:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            except RuntimeError:  # bf16 on a CPU without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
                self.packed = None
            if self.packed is not None and packed_max_rows >= ALL_ROWS:
                self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x.new_empty(0, self.out_features)
        if self.panels is not None and rows <= self.native_max_rows:
            return native.gemm(x, self.panels, self.out_features, self.panel_bias)
        if self.packed is not None and rows <= self.packed_max_rows:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        if rows >= LARGE_BATCH_ROWS:
            return F.linear(x, self.weight, self.bias)
        return self.transposed(x)

    def silu_gated(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for this [gate; up] weight: in the projection's epilogue where the own
        kernel serves the batch and runs it (AMX), else the projection, then native.silu_mul."""
        rows = x.shape[0]
        if self.panels is not None and self.panel_bias is None and 0 < rows <= self.native_max_rows:
            fused = native.gemm_gated(x, self.panels, self.out_features)
            if fused is not None:
                return fused
        return native.silu_mul(self(x))

    def float32_out(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T as float32 whatever x's dtype: treebatch's own kernel writes its float32 sums
        as they are (a bfloat16 model's logits then skip a rounding and a conversion pass over
        the vocabulary), the others' results are converted."""
        if self.panels is not None and 0 < x.shape[0] <= self.native_max_rows:
            return native.gemm(x, self.panels, self.out_features, self.panel_bias, out_dtype=torch.float32)
        return self(x).float()

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        """(W @ x^T)^T with x padded with zero rows to a multiple of 16: the slow path's fast twin."""
        rows = x.shape[0]
        padded_rows = -(-rows // _ROW_MULTIPLE) * _ROW_MULTIPLE
        if padded_rows != rows:
            x = torch.cat([x, x.new_zeros(padded_rows - rows, x.shape[1])])
        out = torch.matmul(self.weight, x.t()).t()[:rows]
        return out if self.bias is None else out + self.bias
