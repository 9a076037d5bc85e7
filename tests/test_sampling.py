"""Sampling: the Sampler on fake logits, and the options end to end on the default model."""

from __future__ import annotations

import math

import pytest
import torch

from treebatch import SamplingParams
from treebatch.core.outputs import NewRequestData
from treebatch.runtime.sampler import Sampler

VOCAB = 8
EOS = 7


def make_sampler(**params_by_id: SamplingParams) -> Sampler:
    sampler = Sampler(VOCAB, eos_token_ids=(EOS,))
    for index, (rid, params) in enumerate(params_by_id.items()):
        sampler.add_request(NewRequestData(rid, params, [1, 2, 3], seed=1000 + index))
    return sampler


def draws(sampler: Sampler, rid: str, logits: torch.Tensor, count: int) -> list[int]:
    return [sampler.sample(logits.unsqueeze(0), [rid]).tokens[0] for _ in range(count)]


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0])


def test_greedy_picks_argmax_and_min_tokens_bans_eos():
    sampler = make_sampler(a=SamplingParams(temperature=0, min_tokens=2), b=SamplingParams(temperature=0))
    tokens = sampler.sample(torch.stack([LOGITS, LOGITS]), ["a", "b"]).tokens
    assert tokens == [0, EOS]  # a may not stop yet: EOS (the argmax) is banned
    tokens = sampler.sample(torch.stack([LOGITS, LOGITS]), ["a", "b"]).tokens
    assert tokens == [0, EOS]
    tokens = sampler.sample(LOGITS.unsqueeze(0), ["a"]).tokens
    assert tokens == [EOS]  # two outputs reached: EOS allowed again


def test_top_k_top_p_min_p_restrict_the_support():
    sampler = make_sampler(
        k=SamplingParams(temperature=1.0, top_k=2),
        p=SamplingParams(temperature=1.0, top_p=0.5),
        m=SamplingParams(temperature=1.0, min_p=0.5),
    )
    probs = LOGITS.softmax(-1)
    assert set(draws(sampler, "k", LOGITS, 200)) <= {EOS, 0}
    # top_p=0.5: EOS alone holds ~0.50 of the mass; the next token starts after 0.5 is reached.
    allowed_p = {EOS} if probs[EOS] >= 0.5 else {EOS, 0}
    assert set(draws(sampler, "p", LOGITS, 200)) <= allowed_p
    allowed_m = {i for i in range(VOCAB) if probs[i] >= 0.5 * probs.max()}
    assert set(draws(sampler, "m", LOGITS, 200)) <= allowed_m


def test_sampling_follows_the_distribution():
    sampler = make_sampler(t=SamplingParams(temperature=1.0))
    counts = torch.bincount(torch.tensor(draws(sampler, "t", LOGITS, 4000)), minlength=VOCAB).float()
    expected = LOGITS.softmax(-1) * 4000
    # Every bucket within 5 standard deviations of its binomial expectation.
    sigma = (expected * (1 - expected / 4000)).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1)


def test_seeded_draws_do_not_depend_on_the_batch():
    alone = make_sampler(s=SamplingParams(temperature=1.0, seed=5))
    crowd = make_sampler(x=SamplingParams(temperature=0.7), s=SamplingParams(temperature=1.0, seed=5))
    crowd._states["s"].generator.manual_seed(1000)  # same seed as "s" in `alone`
    batch = torch.stack([LOGITS.flip(0), LOGITS])
    together = [crowd.sample(batch, ["x", "s"]).tokens[1] for _ in range(50)]
    assert draws(alone, "s", LOGITS, 50) == together


def test_penalties_change_the_logits_as_documented():
    sampler = make_sampler(r=SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0))
    state = sampler._states["r"]
    state.output_token_ids = [7, 7, 0]
    penalized = sampler._apply_penalties_and_bans(LOGITS.unsqueeze(0), [state])[0]
    # token 7: 3.0 / 2 (repetition) - 2 * 1.0 (frequency); token 0: 2.0 / 2 - 1; token 1 (prompt): 1.5 / 2
    assert penalized[7].item() == pytest.approx(3.0 / 2 - 2.0)
    assert penalized[0].item() == pytest.approx(2.0 / 2 - 1.0)
    assert penalized[1].item() == pytest.approx(0.75)
    assert penalized[4].item() == 0.0  # unseen: untouched


def test_logprobs_are_raw_log_softmax_with_ranks():
    sampler = make_sampler(l=SamplingParams(temperature=0, logprobs=2))
    sampled = sampler.sample(LOGITS.unsqueeze(0), ["l"])
    tokens, logprobs = sampled.tokens, sampled.logprobs
    reference = LOGITS.log_softmax(-1)
    entry = logprobs["l"]
    assert list(entry) == [EOS, 0]
    assert entry[EOS] == (pytest.approx(reference[EOS].item()), 1)
    assert entry[0][1] == 2


# -- end to end on the default model -------------------------------------------------------------


def test_seeded_output_is_the_same_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    alone = llm.generate("Tell me about the sea.", params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12)
    batch = llm.generate(
        ["Hello there", "Tell me about the sea.", "Numbers: 1, 2,"], [others, params, others], use_tqdm=False
    )
    assert batch[1].outputs[0].token_ids == alone


def test_n_samples_and_logprobs(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2)
    output = llm.generate({"prompt": "My favourite fruit is"}, params, use_tqdm=False)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    for completion in output.outputs:
        assert len(completion.logprobs) == len(completion.token_ids)
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert token in entry and len(entry) <= 3
            assert all(lp.logprob <= 0.0 for lp in entry.values())
            assert sorted(lp.rank for lp in entry.values())[:2] == [1, 2]
        total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
        assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-6)
    again = llm.generate({"prompt": "My favourite fruit is"}, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]


def test_stop_strings_and_stop_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24)
    full = llm.generate("The capital of France is", greedy, use_tqdm=False)[0].outputs[0]
    assert "answer" in full.text
    stopped = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=["answer"]), use_tqdm=False
    )[0].outputs[0]
    assert stopped.text == full.text[: full.text.index("answer")]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "answer"
    assert len(stopped.token_ids) < len(full.token_ids)

    newline = llm.tokenizer("\n", add_special_tokens=False).input_ids[0]
    by_token = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[newline]),
        use_tqdm=False,
    )[0].outputs[0]
    assert by_token.token_ids[-1] == newline and by_token.finish_reason == "stop"
    assert by_token.token_ids == full.token_ids[: len(by_token.token_ids)]


def test_max_tokens_length_and_prompt_forms(llm):
    ids = llm.tokenizer("Count: one, two,").input_ids
    outputs = llm.generate(
        ["Count: one, two,", {"prompt_token_ids": ids}],
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )
    assert outputs[0].prompt_token_ids == ids and outputs[1].prompt is None
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length" for o in outputs)


def test_chat_template_has_one_bos(llm):
    tokenizer = llm.tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    ids = llm.apply_chat_template(messages)
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        ids = llm.apply_chat_template(messages)
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    finally:
        tokenizer.chat_template = saved
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert output.outputs[0].text.strip()


def test_draws_follow_the_probabilities_and_never_pick_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    drawn = torch.stack([Sampler._draw(probs, generators) for _ in range(20000)])
    first = torch.bincount(drawn[:, 0], minlength=4) / 20000
    assert first[1] == 0 and torch.allclose(first, probs[0], atol=0.015)  # 3+ sigma at 20k draws
    assert (drawn[:, 1] == 3).all()
