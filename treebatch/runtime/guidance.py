"""Guide: the engine's structured-output matchers (llguidance) over the model's own tokenizer.

One Guide per engine, made on the first constrained request (wrapping the tokenizer costs about
a second). Each distinct grammar string is compiled once; every constrained sample gets a copy
of the compiled matcher, so `n > 1` samples of one prompt keep their own state. Per step the
constrained rows' token bitmasks are filled in parallel across the batch (llguidance's executor
drops the GIL) and applied to those rows' logits before sampling; unconstrained rows pay nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from treebatch.structured_outputs import ConstraintError

_BITS = torch.arange(32, dtype=torch.int32)


class Guide:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor(max(1, torch.get_num_threads()))
        self._compiled: dict[str, Any] = {}
        self._words = (vocab_size + 31) // 32

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for `grammar` (compiled once per distinct grammar)."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            import llguidance

            compiled = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise ConstraintError(compiled.get_error())
            self._compiled[grammar] = compiled
        return compiled.deep_copy()

    def allowed(self, matchers: list[Any]) -> torch.Tensor:
        """[len(matchers), vocab] bool: the tokens each matcher admits next."""
        bitmask = torch.empty((len(matchers), self._words), dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), self._words * 4, len(matchers)
        )
        bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool()
