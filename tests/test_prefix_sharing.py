"""Global prefix sharing end to end: same tokens with sharing on and off, every shared prompt
token computed once, and the run summary's metrics."""

from __future__ import annotations

import pytest

from treebatch import LLM, SamplingParams

SYSTEM = (
    "You are a careful assistant for a museum archive. Read the document, then answer the question "
    "in one short sentence, using only facts from the document. "
)
DOCUMENTS = [
    "The lighthouse at Cape Verran was built in 1871 from granite quarried on the island and was "
    "run by three keepers until the lamp was automated in 1958. ",
    "The orchard of the Hallam estate holds ninety-two apple varieties, several of them found nowhere "
    "else, and its oldest tree was planted in 1790 by the gardener Ruth Hallam. ",
]
QUESTIONS = ["When was it built or planted?", "Who is named in it?", "What is it made of or hold?"]
PROMPTS = [SYSTEM + "Document: " + d + "Question: " + q + " Answer:" for d in DOCUMENTS for q in QUESTIONS]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def unshared():
    llm = LLM(dtype="float32", kv_cache_memory=128 << 20, enable_prefix_sharing=False, check_integrity=True)
    return llm.generate(PROMPTS, PARAMS, use_tqdm=False), llm.last_run_summary


def test_sharing_keeps_greedy_tokens_and_computes_each_prefix_once(llm, unshared):
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    baseline, baseline_summary = unshared
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in baseline]
    summary = llm.last_run_summary
    # No prompt here is a prefix of another, so the optimum is exactly the tree's unique tokens.
    assert summary["computed_prompt_tokens"] == summary["unique_prompt_tokens"]
    assert summary["computed_prompt_tokens"] < baseline_summary["computed_prompt_tokens"] // 2
    assert summary["groups"] == 3 and summary["share_histogram"] == {3: 2, 6: 1}
    assert summary["saving_ratio"] > 0.5
    system_and_document = [len(llm.tokenizer(SYSTEM + "Document: " + d).input_ids) for d in DOCUMENTS]
    assert all(o.num_cached_tokens >= min(system_and_document) - 2 for o in outputs)
    assert baseline_summary["saving_ratio"] == 0 and all(o.num_cached_tokens == 0 for o in baseline)


def test_shared_prefix_attention_matches_plain_path(unshared):
    plain_attention = LLM(dtype="float32", kv_cache_memory=128 << 20, enable_shared_prefix_attention=False)
    outputs = plain_attention.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in unshared[0]]


def test_sharing_under_kv_pressure_with_preemption(unshared):
    tight = LLM(dtype="float32", num_blocks=40, block_size=8, max_num_batched_tokens=32, check_integrity=True)
    outputs = tight.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in unshared[0]]
    assert tight.engine.scheduler.kv.num_free_blocks == 40  # every group released its KV


def test_n_samples_share_their_prompt(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=6)
    output = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert output.num_cached_tokens == len(output.prompt_token_ids) - 1
    summary = llm.last_run_summary
    assert summary["computed_prompt_tokens"] == len(output.prompt_token_ids) + 3  # prefix once, last token each


def test_an_abandoned_iterator_aborts_its_requests_and_frees_their_groups(llm):
    params = [SamplingParams(temperature=0, max_tokens=2 if i == 0 else 24, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    steps_whole = llm.last_run_summary["steps"]
    engine = llm.engine
    iterator = llm.generate_iter(PROMPTS, params)
    assert next(iterator)[0] == 0  # the short one finishes first
    iterator.close()  # the rest is aborted, not run to the end
    assert not engine.has_unfinished_requests and not engine.scheduler.requests
    assert engine.stats.num_steps < steps_whole
    assert all(g.is_released for g in engine.scheduler.groups.groups.values())
    kv = engine.scheduler.kv
    kv.check_integrity(engine.scheduler.groups.held_blocks())
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert not engine.output_processor.states  # no completion left behind
    # The engine is whole again: the next batch gives the same tokens.
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == expected
