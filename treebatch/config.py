"""Configuration: frozen, validated dataclasses. Derived values are properties.

The CLI builds its flags from these fields, so there is one list of options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


HIDDEN_ACTS = ("silu", "gelu_tanh")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a decoder-only transformer: Llama's, plus the features other families
    switch on (treebatch/models/families.py says which family sets which)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict in the Hugging Face `rope_scaling` shape:
    # {"rope_type": "linear", "factor": f} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    # Per layer, its sliding window (a query at position p sees keys (p - w, p]) or None for full
    # attention; () when no layer has a window.
    layer_windows: tuple[int | None, ...] = ()
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # norms scale by (norm_offset + weight): 1.0 in Gemma
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2, 3)
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" or "gelu_tanh"
    embedding_multiplier: float = 1.0  # embeddings scaled by this (Gemma: sqrt(hidden_size))
    attn_logit_softcap: float | None = None  # scores -> c tanh(scores / c) (Gemma 2)
    final_logit_softcap: float | None = None  # the same for the logits
    attention_scale: float | None = None  # None: head_dim ** -0.5
    partial_rotary_factor: float = 1.0  # the rotation covers this fraction of each head (Phi-3)
    # The rotary base of the sliding-window layers, where it differs (Gemma 3); they take no scaling.
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim, "rotary dims must be even"
        assert not self.layer_windows or len(self.layer_windows) == self.num_layers
        assert all(w is None or w > 0 for w in self.layer_windows)
        assert self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def max_window(self) -> int | None:
        """The longest sliding window, or None when some layer attends to every key."""
        if not self.layer_windows or any(w is None for w in self.layer_windows):
            return None
        return max(self.layer_windows)  # type: ignore[type-var]

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        norms = (4 if self.sandwich_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + norms
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: fixed-size blocks drawn from a pool sized by a memory budget."""

    block_size: int = 16
    # Bytes of memory for K and V of all layers. None: `kv_cache_fraction` of available memory.
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.25
    max_kv_cache_memory: int = 4 << 30
    # Exact pool size, for tests; overrides the memory budget.
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        assert self.block_size > 0
        assert 0.0 < self.kv_cache_fraction <= 0.9
        assert self.num_blocks is None or self.num_blocks > 0


ORDER_POLICIES = ("fcfs", "dfs", "ratio", "blend")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Token batching: how much work one step may hold, and in which order the batch runs."""

    # Per-step token budget (decodes + prefill chunks). None: measured at start-up on this machine
    # (the step size where tokens/s stops growing), cached per model, CPU and thread count.
    max_num_batched_tokens: int | None = None
    # A safety cap on running requests: admission is bound by free KV blocks and the token budget.
    max_num_seqs: int = 1024
    enable_chunked_prefill: bool = True
    # Global prefix sharing: cut the batch's prefix tree into groups whose prefix KV is computed once.
    enable_prefix_sharing: bool = True
    min_shared_prefix_tokens: int = 8  # shorter shared prefixes are not worth a group (see BENCHMARKS.md)
    # Order of the batch's groups (see treebatch/core/policies.py): fcfs, dfs (tree order),
    # ratio (decode-heavy groups first), blend (compute- and memory-heavy groups mixed). ratio
    # measured best (benchmarks/policy_probe.py: 5% under dfs where output lengths differ per
    # group, the same where they do not); the others stay for ablations.
    order_policy: str = "ratio"

    def __post_init__(self) -> None:
        assert self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0
        assert self.max_num_seqs > 0
        assert self.order_policy in ORDER_POLICIES, f"order_policy must be one of {ORDER_POLICIES}"


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """How the model runner lays a step out: shared-prefix attention and the kept prefix KV."""

    # Attention over a group's shared prefix as one product for all its queries (read once),
    # merged by log-sum-exp; groups with fewer queries in a step take the plain paged path.
    enable_shared_prefix_attention: bool = True
    shared_prefix_attention_min_queries: int = 4
    # A group's single-query rows join its shared-prefix product only from this many in a step
    # (fewer read their whole context in place). None: 8 where the in-place decode kernel is
    # built (benchmarks/cascade_threshold.py: 448-token prefix, kept prefix K/V, 2 cores), else 1.
    shared_prefix_attention_min_decodes: int | None = None
    # Memory for group prefixes' K and V gathered once and kept across steps (0: every step).
    prefix_store_memory: int = 256 << 20
    # Structured outputs: tokens a grammar forces are appended and computed as one chunk in the
    # next step (jump-forward), not sampled one decode step each.
    enable_jump_forward: bool = True

    def __post_init__(self) -> None:
        assert self.shared_prefix_attention_min_queries >= 1
        assert self.shared_prefix_attention_min_decodes is None or self.shared_prefix_attention_min_decodes >= 1
        assert self.prefix_store_memory >= 0

    @property
    def cascade_min_queries(self) -> int | None:
        """Queries a group needs in a step for shared-prefix attention; None: it is off."""
        return self.shared_prefix_attention_min_queries if self.enable_shared_prefix_attention else None

    @property
    def cascade_min_decodes(self) -> int:
        assert self.shared_prefix_attention_min_decodes is not None, "resolve the runner config first"
        return self.shared_prefix_attention_min_decodes


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything `LLM(...)` accepts besides the model path."""

    model: str | None = None  # HF folder or .gguf file; None: the embedded default model
    tokenizer: str | None = None  # HF folder; None: the model's own
    # "auto": bfloat16 where the CPU has bf16 matrix instructions and they measure faster, else
    # float32 (runtime/precision.py); "float32" for exactness against a float32 reference.
    dtype: str = "auto"
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None: one per core
    max_model_len: int | None = None  # None: the model's context length
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    check_integrity: bool = False  # verify the block pool after every step (tests)
    # Write one JSON line per step here (tokens, decode/prefill split, running, KV use, time).
    trace_file: str | None = None

    def __post_init__(self) -> None:
        assert self.dtype in ("auto", "float32", "bfloat16", "float16"), f"unsupported dtype {self.dtype}"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments, routing cache/scheduler/runner fields to their parts."""
        part_classes = {"cache": CacheConfig, "scheduler": SchedulerConfig, "runner": RunnerConfig}
        part_fields = {name: {f.name for f in dataclasses.fields(c)} for name, c in part_classes.items()}
        parts: dict[str, dict[str, Any]] = {name: {} for name in part_classes}
        own: dict[str, Any] = {}
        own_fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in kwargs.items():
            part = next((name for name, names in part_fields.items() if key in names), None)
            if part is not None:
                parts[part][key] = value
            elif key in own_fields:
                own[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}")
        for name, part_class in part_classes.items():
            if not isinstance(own.get(name), part_class):
                own[name] = part_class(**parts[name])
        return cls(**own)
