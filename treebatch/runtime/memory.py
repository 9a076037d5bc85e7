"""Will the model fit? Its weights as the kernels hold them, plus the smallest useful KV cache,
against the memory the OS can still give: checked before any weight is converted, so a model
too big for the machine is refused with the numbers instead of being killed halfway through.

Weights as held (layers/linear.py): a projection keeps one copy of its weight per kernel in
use (`KernelChoice.copies`; runtime/kernel_choice.py measures which serve which batch sizes):
once where one kernel serves every batch size, as the AMD EPYCs measured here do. A tied
vocabulary head adds its kernel's copy beside the embedding either way. The smallest useful KV cache holds one sequence of the full context.
"""

from __future__ import annotations

from dataclasses import dataclass

from treebatch.config import ModelConfig


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    weights: int  # bytes of the weights as the kernels hold them
    kv_cache: int  # bytes of KV for one sequence of the full context
    available: int
    copies: int = 1  # of every projection: one per kernel in use

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def weight_bytes(config: ModelConfig, dtype_bytes: int, copies: int) -> int:
    """`copies` of every projection (one per kernel in use)."""
    embeddings = config.vocab_size * config.hidden_size
    projections = config.num_parameters - embeddings * (1 if config.tie_word_embeddings else 2)
    head = embeddings * copies if not config.tie_word_embeddings else embeddings
    return (projections * copies + embeddings + head) * dtype_bytes


def memory_need(config: ModelConfig, dtype_bytes: int, copies: int, max_model_len: int, available: int) -> MemoryNeed:
    return MemoryNeed(weight_bytes(config, dtype_bytes, copies),
                      config.kv_bytes_per_token(dtype_bytes) * max_model_len, available, copies)


def check_fits(need: MemoryNeed, model_name: str, dtype: str) -> None:
    """Raise MemoryError naming the numbers when the model cannot run here."""
    if need.fits:
        return
    gib = 1 << 30
    raise MemoryError(
        f"{model_name} in {dtype} needs {need.weights / gib:.2f} GiB of weights plus {need.kv_cache / gib:.2f} GiB "
        f"of KV cache for one full-context sequence ({need.total / gib:.2f} GiB), but only "
        f"{need.available / gib:.2f} GiB of memory is available; try dtype=\"bfloat16\" (half the bytes), a "
        f"smaller max_model_len, or a smaller model"
    )
