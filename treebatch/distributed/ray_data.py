"""treebatch inside a Ray Data pipeline.

Ray Data splits rows into blocks blind to prompts, so a shared prefix is computed on every worker
that gets one of its rows. Key the rows by their prefix first, and group by the key, so that a
whole group lands in one batch and its prefix is computed once:

    ds = ds.map_batches(PrefixKey, fn_constructor_kwargs={"column": "prompt"}, concurrency=1)
    ds = ds.groupby("prefix_key").map_groups(
        Generate, fn_constructor_kwargs={"sampling_params": {"max_tokens": 64}}, concurrency=2
    )

`Generate` holds one `LLM` per Ray Data worker and answers each batch as one treebatch batch
(the prefix tree planned over the batch). Batches are dicts of columns (numpy arrays or lists).
"""

from __future__ import annotations

import hashlib
from typing import Any

from treebatch.sampling_params import SamplingParams

# Rows whose prompts agree on their first this many tokens share a key: a system prompt or a
# document is usually longer, and a shorter common start is not worth keeping together.
PREFIX_KEY_TOKENS = 64


def prefix_key(token_ids: list[int], num_tokens: int = PREFIX_KEY_TOKENS) -> str:
    """A stable key of a prompt's first `num_tokens` tokens."""
    head = ",".join(map(str, token_ids[:num_tokens])).encode()
    return hashlib.blake2b(head, digest_size=8).hexdigest()


class PrefixKey:
    """`map_batches` callable: adds `key_column`, the prefix key of each row's `column` (text,
    tokenized with the model's tokenizer, or token ids)."""

    def __init__(self, column: str = "prompt", key_column: str = "prefix_key", model: str | None = None,
                 num_tokens: int = PREFIX_KEY_TOKENS) -> None:
        from treebatch.tokenizer import load_tokenizer_only

        self.tokenizer = load_tokenizer_only(model).tokenizer
        self.column, self.key_column, self.num_tokens = column, key_column, num_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = []
        for prompt in batch[self.column]:
            ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else [int(t) for t in prompt]
            keys.append(prefix_key(ids, self.num_tokens))
        return {**batch, self.key_column: keys}


class Generate:
    """`map_batches` / `map_groups` callable: answers `column` into `output_column` with one LLM
    per worker (its threads: `num_threads`, default all the worker's)."""

    def __init__(self, column: str = "prompt", output_column: str = "generated_text",
                 sampling_params: SamplingParams | dict[str, Any] | None = None, **engine_options: Any) -> None:
        from treebatch.llm import LLM

        self.llm = LLM(**engine_options)
        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        self.params = sampling_params or SamplingParams()
        self.column, self.output_column = column, output_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": [int(t) for t in p]} for p in batch[self.column]]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return {**batch, self.output_column: [o.outputs[0].text for o in outputs]}
