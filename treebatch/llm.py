"""LLM: the offline facade in the shape vLLM users know. The engine does the work."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from typing import Any, Sequence

from tqdm import tqdm

from treebatch.config import EngineConfig
from treebatch.core.request import Request
from treebatch.engine import LLMEngine
from treebatch.inputs import TokenIdError, check_token_ids, fit_max_tokens
from treebatch.outputs import RequestOutput
from treebatch.sampling_params import SamplingParams
from treebatch.tokenizer import chat_token_ids

PromptType = str | dict[str, Any]
_SAMPLE_SEPARATOR = "#"


class LLM:
    """`LLM(model=None, **config)`: model is a Hugging Face folder, a .gguf file, or None for the
    embedded default model; config holds any EngineConfig, CacheConfig or SchedulerConfig field."""

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **config)
        self.engine = LLMEngine(self.config)
        self._seed_source = random.Random(self.config.seed)
        self._next_id = 0
        self.last_run_summary: dict[str, Any] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt token ids of one conversation, as `chat` computes them. ValueError if the
        model has no chat template (a base model) or `chat_template_kwargs` is not an object of
        JSON values."""
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt, chat_template_kwargs, self.model_name)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them. `chat_template_kwargs` are extra
        variables for the chat template (Qwen3: `{"enable_thinking": False}`), the same for every
        conversation. A model without a chat template raises ValueError before anything runs."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.apply_chat_template(list(c), add_generation_prompt, chat_template_kwargs)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for index, output in self.generate_iter(prompts, sampling_params, use_tqdm=use_tqdm):
            outputs[index] = output
        return outputs  # type: ignore[return-value]  # every index is yielded exactly once

    def generate_iter(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (input index, output) for each prompt as soon as all n of its samples finish.

        The whole batch goes to the engine at once (the prefix-tree plan is batch-wide), so
        outputs come in plan order, not input order. `last_run_summary` is set once the
        iterator is exhausted. An iterator closed early (or left by an exception, such as a
        signal's) aborts the requests it has not yielded: their KV is freed and their groups are
        released bottom-up, nothing more runs for them.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        texts, token_ids = zip(*(self._tokenize(p) for p in prompts)) if prompts else ((), ())

        self.engine.reset_stats()
        prompt_ids: list[str] = []
        sequences: dict[str, list[Request]] = {}
        owner: dict[str, int] = {}  # engine request id -> input index
        for index, (ids, params) in enumerate(zip(token_ids, params_list)):
            prompt_id = str(self._next_id)
            self._next_id += 1
            prompt_ids.append(prompt_id)
            sequences[prompt_id] = [self._make_request(prompt_id, k, ids, params) for k in range(params.n)]
            for request in sequences[prompt_id]:
                owner[request.request_id] = index
        self.engine.add_requests([request for group in sequences.values() for request in group])

        pending = [params.n for params in params_list]
        engine = self.engine
        bar = tqdm(total=len(owner), desc="generating", unit="seq", file=sys.stderr, disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests:
                finished = engine.step()
                if not finished:
                    continue
                bar.update(len(finished))
                bar.set_postfix(gen_tok_s=engine.stats.summary()["generated_tokens_per_s"], refresh=False)
                done = []
                for request in finished:
                    index = owner[request.request_id]
                    pending[index] -= 1
                    if pending[index] == 0:
                        done.append(index)
                for index in done:
                    pid = prompt_ids[index]
                    yield index, self._request_output(pid, texts[index], token_ids[index], sequences[pid])
                    del sequences[pid]  # a long batch should not keep every finished request alive
        finally:
            bar.close()
            # Left early: abort what has not finished, drop the completions not yielded.
            unyielded = [r for group in sequences.values() for r in group]
            engine.abort([r.request_id for r in unyielded if not r.is_finished])
            for request in unyielded:
                engine.output_processor.discard(request.request_id)
        self.last_run_summary = engine.stats.summary()

    # -- helpers ---------------------------------------------------------------------------------

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling params for {count} prompts")
        return params

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            try:
                check_token_ids(ids, self.engine.model_config.vocab_size)
            except TokenIdError as exc:
                raise TokenIdError(f"prompt {exc}") from None
            return prompt.get("prompt"), ids
        if "prompt" in prompt:
            return prompt["prompt"], self.tokenizer(prompt["prompt"]).input_ids
        raise ValueError("a prompt is a str, {'prompt': str} or {'prompt_token_ids': [...]}")

    def _make_request(self, prompt_id: str, index: int, ids: list[int], params: SamplingParams) -> Request:
        if not ids:
            raise ValueError(f"prompt {prompt_id} is empty")
        if params.seed is not None:
            # Sample i of a seeded prompt gets its own stream, the same in any batch.
            seed = params.seed if index == 0 else hash((params.seed, index)) & 0x7FFFFFFF
        else:
            seed = self._seed_source.getrandbits(63)
        max_tokens = fit_max_tokens(len(ids), self.max_model_len, params.max_tokens)
        request_id = prompt_id if params.n == 1 else f"{prompt_id}{_SAMPLE_SEPARATOR}{index}"
        return Request(request_id, ids, params, self.engine.eos_token_ids, max_tokens=max_tokens, seed=seed)

    def _request_output(
        self, prompt_id: str, text: str | None, ids: list[int], group: list[Request]
    ) -> RequestOutput:
        """The prompt's outputs as the output processor decided them (text, reasons, logprobs)."""
        processor = self.engine.output_processor
        completions = [processor.pop(request.request_id).completion(index) for index, request in enumerate(group)]
        cached = max((request.num_cached_tokens for request in group), default=0)
        return RequestOutput(prompt_id, text, list(ids), completions, num_cached_tokens=cached)
