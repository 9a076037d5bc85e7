"""The output processor against the full decode: incremental text, stop strings, finish and stop
reasons, on random token sequences of the default model's tokenizer (byte-level BPE, GGUF)."""

from __future__ import annotations

import random

import pytest

from treebatch.core.request import Request, RequestStatus
from treebatch.output_processor import IncrementalDetokenizer, OutputProcessor, find_first_stop, make_decode
from treebatch.sampling_params import SamplingParams

TEXTS = [
    "héllo wörld, naïve café",
    "日本語のテキストと中文字符",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "Ελληνικά και русский текст",
    "def f(x):\n    return x ** 2  # ✓\n",
    "␞ never ␞ stop ␟",
    "  spaces   and\ttabs\n\nnewlines",
]


@pytest.fixture(scope="module")
def tokenizer():
    from treebatch.tokenizer import load_tokenizer_only

    return load_tokenizer_only().tokenizer


def _random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Tokens of multilingual text (multi-byte characters split over tokens), raw byte tokens
    (often invalid UTF-8), special tokens and arbitrary vocabulary ids, mixed."""
    text_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    special = sorted(tokenizer.all_special_ids) + list(range(3, 17))
    byte_tokens = range(17, 17 + 256)
    ids: list[int] = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.4:
            source = rng.choice(text_ids)
            start = rng.randrange(len(source))
            ids.extend(source[start : start + rng.randint(1, 8)])
        elif kind < 0.6:
            ids.extend(rng.choice(byte_tokens) for _ in range(rng.randint(1, 4)))
        elif kind < 0.75:
            ids.append(rng.choice(special))
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:length]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_is_the_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234 + skip_special_tokens)
    decode = make_decode(tokenizer, skip_special_tokens)
    for _ in range(300):
        ids = _random_ids(tokenizer, rng, rng.randint(1, 80))
        detokenizer = IncrementalDetokenizer(decode)
        for token in ids:
            detokenizer.append(token)
            committed = detokenizer.num_chars
            tail = detokenizer.decode_tail()
            # Committed text plus the tail is the full decode of the tokens so far, at every step.
            full = tokenizer.decode(detokenizer.token_ids, skip_special_tokens=skip_special_tokens)
            assert "".join(detokenizer._pieces)[:committed] + tail == full
        assert detokenizer.flush() == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_make_decode_matches_tokenizer_decode(tokenizer):
    rng = random.Random(7)
    for skip in (True, False):
        decode = make_decode(tokenizer, skip)
        for _ in range(50):
            ids = _random_ids(tokenizer, rng, 30)
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


def _reference(tokenizer, ids: list[int], params: SamplingParams, finished_by_length: bool):
    """Today's rule, decoding the whole output after each token: the request stops at the first
    token whose text holds a stop string; the text is cut before the first stop string."""
    stops = params.stop_strings
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=params.skip_special_tokens)
        hit = find_first_stop(text, stops) if stops else None
        if hit is not None or k == len(ids):
            break
    if hit is not None:
        index, stop = hit
        cut = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
        return k, cut, "stop", stop
    return k, text, "length" if finished_by_length else "stop", None


def _run(processor: OutputProcessor, ids: list[int], params: SamplingParams):
    request = Request("r", [1], params, max_tokens=max(len(ids), 1))
    processor.add_request(request)
    for token in ids:
        request.append_output_token(token)
        if processor.add_token("r", token):
            request.status = RequestStatus.FINISHED_STOPPED
            break
    else:
        request.status = RequestStatus.FINISHED_LENGTH
    processor.finish(request)
    return request, processor.pop("r")


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_match_the_full_decode_search(tokenizer, include_stop):
    rng = random.Random(99 + include_stop)
    processor = OutputProcessor(tokenizer)
    num_stopped = 0
    for trial in range(300):
        skip = trial % 3 != 0
        ids = _random_ids(tokenizer, rng, rng.randint(1, 60))
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(1, 3)):  # pieces of the text (so they hit), some never seen
            if full and rng.random() < 0.8:
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["\u241e never", "zzzq", "日本", "\ufffd"]))
        params = SamplingParams(stop=stops, skip_special_tokens=skip, include_stop_str_in_output=include_stop)
        request, state = _run(processor, ids, params)
        k, text, finish, stop = _reference(tokenizer, ids, params, finished_by_length=True)
        assert len(state.token_ids) == k, (ids, stops)
        assert (state.text, state.finish_reason, state.stop_reason) == (text, finish, stop), (ids, stops)
        num_stopped += stop is not None
    assert num_stopped > 150
    assert not processor.states


def test_finish_reasons_without_stop_strings(tokenizer):
    processor = OutputProcessor(tokenizer)
    ids = tokenizer("Hello there, 日本", add_special_tokens=False).input_ids
    params = SamplingParams(stop_token_ids=[ids[-1]])
    request = Request("a", [1], params, eos_token_ids=(0,), max_tokens=len(ids))
    processor.add_request(request)
    for token in ids:
        request.append_output_token(token)
        assert not processor.add_token("a", token)
    status = request.check_stop(10_000)
    assert status == RequestStatus.FINISHED_STOPPED
    request.status = status
    processor.finish(request)
    state = processor.pop("a")
    assert state.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert (state.finish_reason, state.stop_reason) == ("stop", ids[-1])
    assert state.detokenizer.prefix_offset == len(ids)  # decoded once, at the end

    request = Request("b", [1], SamplingParams(), max_tokens=2)
    processor.add_request(request)
    for token in ids[:2]:
        request.append_output_token(token)
        processor.add_token("b", token)
    request.status = RequestStatus.FINISHED_LENGTH
    processor.finish(request)
    completion = processor.pop("b").completion(3)
    assert (completion.index, completion.finish_reason, completion.stop_reason) == (3, "length", None)
    assert completion.token_ids == ids[:2] and completion.logprobs is None


def test_logprobs_decoded_and_summed(tokenizer):
    processor = OutputProcessor(tokenizer)
    request = Request("a", [1], SamplingParams(logprobs=1), max_tokens=2)
    processor.add_request(request)
    for token, entry in [(100, {100: (-0.5, 1), 200: (-1.5, 2)}), (300, {300: (-0.25, 2), 17: (-0.1, 1)})]:
        request.append_output_token(token)
        request.output_logprobs.append(entry)
        processor.add_token("a", token)
    request.status = RequestStatus.FINISHED_LENGTH
    processor.finish(request)
    completion = processor.pop("a").completion(0)
    assert completion.cumulative_logprob == pytest.approx(-0.75)
    assert completion.logprobs[1][17].decoded_token == tokenizer.decode([17])
    assert completion.logprobs[0][100].rank == 1 and completion.logprobs[0][200].logprob == -1.5


def test_engine_stops_at_the_token_a_full_decode_would(llm):
    """Through the engine: a stop string taken from the unstopped text ends the request at the
    first token whose full decode holds it, with the text cut as the full decode gives it."""
    from conftest import PROMPTS

    prompts = PROMPTS[:6]
    full = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    rng = random.Random(5)
    stops, params = [], []
    for output in full:
        text = output.outputs[0].text
        start = rng.randrange(len(text) // 2, len(text) - 3)
        stops.append(text[start : start + 3])
        params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stops[-1]],
                                     include_stop_str_in_output=len(stops) % 2 == 0))
    stopped = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = llm.tokenizer
    for output, again, p in zip(full, stopped, params):
        ids = output.outputs[0].token_ids
        k, text, finish, stop = _reference(tokenizer, ids, p, finished_by_length=True)
        completion = again.outputs[0]
        assert completion.token_ids == ids[:k]
        assert (completion.text, completion.finish_reason, completion.stop_reason) == (text, finish, stop)
    assert not llm.engine.output_processor.states
