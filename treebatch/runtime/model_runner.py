"""ModelRunner: StepPlan -> layout -> tensors -> forward -> sample -> StepResult.

The runner decides nothing about what runs. The step's row layout (which chunks read a group's
prefix once, and in which order rows lie) comes from core/step_layout.py, the tensors from
runtime/step_inputs.py; the runner copies partial prefix blocks, runs the model and samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from treebatch.config import RunnerConfig
from treebatch.core.outputs import StepPlan, StepResult
from treebatch.core.step_layout import layout_step
from treebatch.layers import native
from treebatch.models.decoder import DecoderForCausalLM
from treebatch.runtime.guidance import Guide
from treebatch.runtime.prefix_store import PrefixKVStore
from treebatch.runtime.sampler import Sampler
from treebatch.runtime.step_inputs import build_step_inputs

# With the C kernel, a group's decodes read the prefix once per run of members in the same pass
# as their own keys (native.cascade_decode_attention): never more memory than each reading its
# whole context, and the same arithmetic (benchmarks/cascade_threshold.py, AMD EPYC AVX2, 2 cores:
# 0.88-1.06x of the plain kernel's time from 1 to 32 members, within the noise, at SmolLM2's and
# Llama-1B's head shapes). So from two decodes on; one alone gains nothing from the split.
# Without the kernel the torch cascade gains from the first one.
CASCADE_MIN_DECODES_IN_PLACE = 2


def resolve_runner_config(config: RunnerConfig) -> RunnerConfig:
    """The config with the decode threshold the machine decides filled in."""
    if config.shared_prefix_attention_min_decodes is not None:
        return config
    in_place = native.paged_decode_kernel() is not None
    return dataclasses.replace(config, shared_prefix_attention_min_decodes=CASCADE_MIN_DECODES_IN_PLACE if in_place else 1)


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        eos_token_ids: tuple[int, ...],
        config: RunnerConfig,
        guide: Callable[[], Guide] | None = None,
    ) -> None:
        self.model = model
        self.config = resolve_runner_config(config)
        self.kv_cache = kv_cache
        self.block_size = block_size
        num_layers, _, _, num_kv_heads, head_dim = kv_cache.shape
        self.prefix_store = (
            PrefixKVStore(num_layers, 2 * num_kv_heads * head_dim * kv_cache.element_size(), self.config.prefix_store_memory)
            if self.config.prefix_store_memory > 0
            else None
        )
        self.sampler = Sampler(model.config.vocab_size, eos_token_ids, guide, self.config.enable_jump_forward)

    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_request_ids:
            self.sampler.remove_request(request_id)
        for new in plan.new_requests:
            self.sampler.add_request(new)
        if plan.is_empty:
            return StepResult({})
        self._copy_blocks(plan.block_copies)
        layout = layout_step(plan.chunks, self.config.cascade_min_queries, self.config.cascade_min_decodes)
        input_ids, positions, _, metadata = build_step_inputs(layout, self.block_size, self.prefix_store)
        sample_rows, sample_ids = layout.sample_rows()
        logits = self.model.forward(
            input_ids, positions, metadata, self.kv_cache, torch.tensor(sample_rows, dtype=torch.long)
        )
        if not sample_ids:
            return StepResult({})
        sampled = self.sampler.sample(logits, sample_ids)
        return StepResult(dict(zip(sample_ids, sampled.tokens)), sampled.logprobs, sampled.forced, sampled.grammar_done)

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write of partial prefix blocks: a member's own copy of the prefix's tail KV."""
        size = self.block_size
        for source, target, num_tokens in copies:
            self.kv_cache[:, :, target * size : target * size + num_tokens] = self.kv_cache[
                :, :, source * size : source * size + num_tokens
            ]
