"""Batch file reading, body-to-SamplingParams mapping, and output line shapes (no model)."""

from __future__ import annotations

import json
import pytest

from treebatch.batch import (
    BatchEntry,
    BatchWriter,
    LineError,
    RequestError,
    chat_body,
    PromptTokenizer,
    completion_body,
    parse_body,
    parse_lines,
    prepare_window,
    read_batch,
    windows,
)
from treebatch.batch.requests import CHAT_DEFAULT_MAX_TOKENS_CAP, CHAT_URL, COMPLETIONS_URL
from treebatch.outputs import CompletionOutput, Logprob, RequestOutput


def line(custom_id: object, url: str = COMPLETIONS_URL, body: object = None, method: str = "POST") -> str:
    record = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"prompt": "Hi"}}
    return json.dumps(record)


# --- reader ---------------------------------------------------------------------------


def test_reader_reports_each_kind_of_bad_line_and_goes_on(tmp_path):
    lines = [
        line("good-1"),
        "",  # blank lines are skipped but still counted
        "{not json",
        "[1, 2]",
        json.dumps({"method": "POST", "url": COMPLETIONS_URL, "body": {"prompt": "x"}}),
        line(7),
        line("good-1"),
        line("bad-method", method="GET"),
        line("bad-url", url="/v1/embeddings"),
        json.dumps({"custom_id": "bad-body", "method": "POST", "url": CHAT_URL, "body": "hello"}),
        line("bad-temp", body={"prompt": "x", "temperature": "hot"}),
        line("bad-range", body={"prompt": "x", "top_p": 1.5}),
        line("good-2", url=CHAT_URL, body={"messages": [{"role": "user", "content": "Hi"}]}),
        "   ",
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    entries = list(read_batch(path))

    good = [e for e in entries if isinstance(e, BatchEntry)]
    errors = [e for e in entries if isinstance(e, LineError)]
    assert [(e.line, e.custom_id) for e in good] == [(1, "good-1"), (13, "good-2")]
    by_line = {e.line: e for e in errors}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert by_line[3].code == "invalid_json" and by_line[3].custom_id is None
    assert by_line[4].code == "invalid_json"
    assert by_line[5].code == "missing_custom_id"
    assert by_line[6].code == "missing_custom_id"
    assert by_line[7].code == "duplicate_custom_id" and by_line[7].custom_id == "good-1"
    assert "method" in by_line[8].message
    assert by_line[9].code == "unsupported_url"
    assert "body" in by_line[10].message
    assert "temperature" in by_line[11].message and by_line[11].custom_id == "bad-temp"
    assert "top_p" in by_line[12].message
    for number, error in by_line.items():
        assert error.message.startswith(f"line {number}: ")


def test_reader_handles_bom_and_invalid_utf8():
    entries = list(parse_lines([("\ufeff" + line("a")).encode(), b"\xff\xfe{", line("b").encode()]))
    assert isinstance(entries[0], BatchEntry) and entries[0].custom_id == "a"
    assert isinstance(entries[1], LineError) and "UTF-8" in entries[1].message
    assert isinstance(entries[2], BatchEntry) and entries[2].line == 3


def test_a_failed_line_still_claims_its_custom_id():
    entries = list(parse_lines([line("x", method="GET"), line("x")]))
    assert [type(e) for e in entries] == [LineError, LineError]
    assert entries[1].code == "duplicate_custom_id"


# --- body -> prompt and SamplingParams ----------------------------------------------


def test_completions_body_maps_every_field():
    body = {
        "model": "m", "prompt": "Hello", "max_tokens": 30, "temperature": 0.5, "top_p": 0.9, "n": 2,
        "stop": ["\n"], "seed": 3, "logprobs": 2, "presence_penalty": 0.1, "frequency_penalty": -0.2,
        "top_k": 5, "min_p": 0.05, "min_tokens": 2, "ignore_eos": True, "repetition_penalty": 1.1,
        "stop_token_ids": [7], "user": "ignored",
    }
    request = parse_body(COMPLETIONS_URL, body)
    p = request.params
    assert request.prompt == "Hello" and request.messages is None and not request.is_chat
    assert request.logprobs == 2 and request.model == "m" and request.max_tokens_given
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop_strings, p.seed, p.logprobs) == (30, 0.5, 0.9, 2, ["\n"], 3, 2)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.min_p, p.min_tokens) == (0.1, -0.2, 5, 0.05, 2)
    assert (p.ignore_eos, p.repetition_penalty, p.stop_token_ids) == (True, 1.1, [7])


def test_completions_defaults_and_prompt_forms():
    request = parse_body(COMPLETIONS_URL, {"prompt": "x"})
    assert request.params.max_tokens == 16 and not request.max_tokens_given and request.logprobs is None
    assert parse_body(COMPLETIONS_URL, {"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_body(COMPLETIONS_URL, {"prompt": ["one"]}).prompt == "one"
    assert parse_body(COMPLETIONS_URL, {"prompt": [[4, 5]]}).prompt == [4, 5]


def test_chat_body_maps_messages_and_logprobs():
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        "max_completion_tokens": 12, "max_tokens": 99, "logprobs": True, "top_logprobs": 3,
        "response_format": {"type": "text"},
    }
    request = parse_body(CHAT_URL, body)
    assert request.is_chat and request.prompt is None
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert request.params.max_tokens == 12  # max_completion_tokens wins
    assert request.logprobs == 3 and request.params.logprobs == 3
    only_flag = parse_body(CHAT_URL, {"messages": body["messages"], "logprobs": True})
    assert only_flag.logprobs == 0
    plain = parse_body(CHAT_URL, {"messages": body["messages"]})
    assert plain.logprobs is None and plain.params.max_tokens is None and not plain.max_tokens_given


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        (COMPLETIONS_URL, {}, "prompt"),
        (COMPLETIONS_URL, {"prompt": ""}, "prompt"),
        (COMPLETIONS_URL, {"prompt": ["a", "b"]}, "one prompt"),
        (COMPLETIONS_URL, {"prompt": [1, -2]}, "prompt"),
        (COMPLETIONS_URL, {"prompt": [1, True]}, "prompt"),
        (COMPLETIONS_URL, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS_URL, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        (COMPLETIONS_URL, {"prompt": "x", "temperature": -1}, "temperature"),
        (COMPLETIONS_URL, {"prompt": "x", "temperature": True}, "temperature"),
        (COMPLETIONS_URL, {"prompt": "x", "top_p": 0}, "top_p"),
        (COMPLETIONS_URL, {"prompt": "x", "n": 0}, "n"),
        (COMPLETIONS_URL, {"prompt": "x", "stop": [1]}, "stop"),
        (COMPLETIONS_URL, {"prompt": "x", "stop": ""}, "stop"),
        (COMPLETIONS_URL, {"prompt": "x", "seed": "1"}, "seed"),
        (COMPLETIONS_URL, {"prompt": "x", "logprobs": 50}, "logprobs"),
        (COMPLETIONS_URL, {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        (COMPLETIONS_URL, {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        (COMPLETIONS_URL, {"prompt": "x", "top_k": -2}, "top_k"),
        (COMPLETIONS_URL, {"prompt": "x", "min_p": 2}, "min_p"),
        (COMPLETIONS_URL, {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        (COMPLETIONS_URL, {"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
        (COMPLETIONS_URL, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        (COMPLETIONS_URL, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        (COMPLETIONS_URL, {"prompt": "x", "echo": True}, "echo"),
        (COMPLETIONS_URL, {"prompt": "x", "stream": True}, "stream"),
        (COMPLETIONS_URL, {"prompt": "x", "best_of": 3}, "best_of"),
        (COMPLETIONS_URL, {"prompt": "x", "messages": []}, "messages"),
        (COMPLETIONS_URL, {"prompt": "x", "model": 3}, "model"),
        (CHAT_URL, {}, "messages"),
        (CHAT_URL, {"messages": []}, "messages"),
        (CHAT_URL, {"messages": ["hi"]}, "messages[0]"),
        (CHAT_URL, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (CHAT_URL, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (CHAT_URL, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -4}, "max_completion_tokens"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        (CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
    ],
)
def test_invalid_body_fields_name_the_field(url, body, field):
    with pytest.raises(RequestError) as info:
        parse_body(url, body)
    assert field in info.value.message


# --- structured outputs ----------------------------------------------------------------

_SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}}, "required": ["label"]}


def _body(url: str, **fields: object) -> dict:
    base = {"messages": [{"role": "user", "content": "x"}]} if url == CHAT_URL else {"prompt": "x"}
    return {**base, **fields}


both_urls = pytest.mark.parametrize("url", [COMPLETIONS_URL, CHAT_URL])


@both_urls
@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": _SCHEMA, "strict": True}}},
            "json", _SCHEMA,
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": _SCHEMA, "description": "d", "strict": False}}},
            "json", _SCHEMA,
        ),
        ({"structured_outputs": {"json": _SCHEMA}}, "json", _SCHEMA),
        ({"structured_outputs": {"json": json.dumps(_SCHEMA)}}, "json", json.dumps(_SCHEMA)),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, "regex", "[0-9]{3}"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, "grammar", 'start: "a" | "b"'),
        ({"structured_outputs": {"json_object": True}}, "json_object", True),
        ({"structured_outputs": {"regex": "a+", "json": None, "choice": None}}, "regex", "a+"),  # nulls: absent
        ({"guided_json": _SCHEMA}, "json", _SCHEMA),
        ({"guided_json": json.dumps(_SCHEMA)}, "json", json.dumps(_SCHEMA)),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"guided_choice": ["A", "B", "C"]}, "choice", ["A", "B", "C"]),
        ({"guided_grammar": 'start: "x"+'}, "grammar", 'start: "x"+'),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "regex", "a"),  # the backend: ignored
        ({"guided_regex": "a", "guided_json": None, "response_format": {"type": "text"}}, "regex", "a"),
    ],
)
def test_structured_output_fields_map_to_the_constraint(url, fields, kind, value):
    constraint = parse_body(url, _body(url, **fields)).params.structured_outputs
    assert constraint is not None and constraint.kind == kind
    assert getattr(constraint, kind) == value


@both_urls
@pytest.mark.parametrize(
    "fields",
    [{}, {"response_format": {"type": "text"}}, {"guided_decoding_backend": "llguidance"}, {"structured_outputs": None}],
)
def test_no_structured_output_field_means_no_constraint(url, fields):
    assert parse_body(url, _body(url, **fields)).params.structured_outputs is None


@both_urls
@pytest.mark.parametrize(
    ("fields", "code", "start"),
    [
        # compiling fails: the constraint is bad
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
         "invalid_constraint", "response_format.json_schema.schema: "),
        ({"structured_outputs": {"json": {"type": "string", "pattern": "(("}}}, "invalid_constraint", "structured_outputs.json: "),
        ({"structured_outputs": {"json": "{not json"}}, "invalid_constraint", "structured_outputs.json: the schema is not valid JSON"),
        ({"structured_outputs": {"regex": "(a"}}, "invalid_constraint", "structured_outputs.regex: "),
        ({"structured_outputs": {"grammar": "start: x"}}, "invalid_constraint", "structured_outputs.grammar: "),
        ({"structured_outputs": {"choice": []}}, "invalid_constraint", "structured_outputs.choice: "),
        ({"guided_json": {"$ref": "#/nowhere"}}, "invalid_constraint", "guided_json: "),
        ({"guided_regex": "(a"}, "invalid_constraint", "guided_regex: "),
        ({"guided_choice": ["a", ""]}, "invalid_constraint", "guided_choice: "),
        ({"guided_grammar": "start: x"}, "invalid_constraint", "guided_grammar: "),
        # the shape is wrong
        ({"response_format": "json"}, "invalid_request", "response_format: must be an object"),
        ({"response_format": {"type": "json_schema"}}, "invalid_request", "response_format.json_schema: "),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "invalid_request", "response_format.json_schema.schema: required"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}},
         "invalid_request", "response_format.json_schema.schema: must be an object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "name": 3}}},
         "invalid_request", "response_format.json_schema.name: "),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
         "invalid_request", "response_format.json_schema.strict: "),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "format": "x"}}},
         "invalid_request", "response_format.json_schema: unknown key 'format'"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "invalid_request", "response_format: unknown key 'schema'"),
        ({"response_format": {"type": "structural_tag"}}, "invalid_request", "response_format.type: "),
        ({"structured_outputs": ["regex"]}, "invalid_request", "structured_outputs: must be an object"),
        ({"structured_outputs": {"pattern": "a"}}, "invalid_request", "structured_outputs: unknown key 'pattern'"),
        ({"structured_outputs": {"regex": "a", "disable_fallback": True}},
         "invalid_request", "structured_outputs: unknown key 'disable_fallback'"),
        ({"structured_outputs": {}}, "invalid_request", "structured_outputs: give exactly one"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "invalid_request", "structured_outputs: give exactly one"),
        ({"structured_outputs": {"json_object": False}}, "invalid_request", "structured_outputs.json_object: must be true"),
        ({"structured_outputs": {"regex": 5}}, "invalid_request", "structured_outputs.regex: must be a string"),
        ({"structured_outputs": {"json": 5}}, "invalid_request", "structured_outputs.json: must be a JSON schema"),
        ({"guided_json": [1]}, "invalid_request", "guided_json: must be a JSON schema"),
        ({"guided_regex": ["a"]}, "invalid_request", "guided_regex: must be a string"),
        ({"guided_choice": "a"}, "invalid_request", "guided_choice: must be a list of strings"),
        ({"guided_choice": ["a", 1]}, "invalid_request", "guided_choice: must be a list of strings"),
        ({"guided_grammar": {"start": "x"}}, "invalid_request", "guided_grammar: must be a string"),
        ({"guided_regex": "a", "guided_decoding_backend": 1}, "invalid_request", "guided_decoding_backend: must be a string"),
        ({"guided_json": {}, "guided_whitespace_pattern": " *"}, "invalid_request", "guided_whitespace_pattern: not supported"),
        # two constraints at once
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"},
         "invalid_request", "response_format: conflicts with guided_regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}, "structured_outputs": {"regex": "a"}},
         "invalid_request", "response_format: conflicts with structured_outputs"),
        ({"structured_outputs": {"json": {}}, "guided_json": {}, "guided_choice": ["a"]},
         "invalid_request", "structured_outputs: conflicts with guided_json, guided_choice"),
        ({"guided_regex": "a", "guided_grammar": 'start: "a"'}, "invalid_request", "guided_regex: conflicts with guided_grammar"),
    ],
)
def test_bad_structured_output_fields_are_refused_naming_the_field(url, fields, code, start):
    with pytest.raises(RequestError) as info:
        parse_body(url, _body(url, **fields))
    assert info.value.code == code
    assert info.value.message.startswith(start), info.value.message
    assert "\n" not in info.value.message


def test_a_constraint_error_quoting_a_huge_constraint_is_cut_short():
    with pytest.raises(RequestError) as info:
        parse_body(COMPLETIONS_URL, _body(COMPLETIONS_URL, guided_regex="(" + "a" * 100_000))
    assert info.value.code == "invalid_constraint" and len(info.value.message) < 1100


@both_urls
def test_a_bad_constraint_is_an_error_record_for_its_line(url):
    lines = [
        line("ok", url, _body(url, guided_regex="[0-9]+")),
        line("bad", url, _body(url, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}})),
        line("clash", url, _body(url, guided_regex="a", guided_choice=["a"])),
    ]
    ok, bad, clash = parse_lines(lines)
    assert isinstance(ok, BatchEntry) and ok.request.params.structured_outputs.regex == "[0-9]+"
    assert isinstance(bad, LineError) and bad.code == "invalid_constraint" and bad.custom_id == "bad"
    assert bad.message.startswith("line 2: body.response_format.json_schema.schema: ")
    assert isinstance(clash, LineError) and clash.code == "invalid_request"
    assert clash.message.startswith("line 3: body.guided_regex: conflicts with guided_choice")


class _Tokenizer:
    """One token per character; a chat renders as its contents with two marker characters each."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def apply_chat_template(self, messages: list, tokenize: bool, add_generation_prompt: bool) -> str | list[str]:
        if messages and isinstance(messages[0], list):
            return [self.apply_chat_template(m, tokenize, add_generation_prompt) for m in messages]
        return "".join(f"<{m['content']}>" for m in messages)

    def __len__(self) -> int:
        return 1000


def _prepare(body: dict, url: str = COMPLETIONS_URL, max_model_len: int = 50, tokenizer=None):
    entry = BatchEntry(3, "id", url, parse_body(url, body))
    (result,) = prepare_window([entry], PromptTokenizer(tokenizer or _Tokenizer(), max_model_len))
    return result


def test_prepare_builds_engine_prompts_and_fits_defaults_to_the_context():
    prepared = _prepare({"prompt": "abc"})
    assert prepared.engine_prompt == {"prompt_token_ids": [97, 98, 99]} and prepared.params.max_tokens == 16
    assert _prepare({"prompt": "a" * 40}).params.max_tokens == 10  # the default shrinks to the room left
    assert _prepare({"prompt": [3, 4]}).engine_prompt == {"prompt_token_ids": [3, 4]}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    prepared = _prepare(chat, CHAT_URL)
    assert prepared.token_ids.tolist() == [ord(c) for c in "<hi>"] and prepared.params.max_tokens == 46
    assert _prepare(chat, CHAT_URL, max_model_len=100_000).params.max_tokens == CHAT_DEFAULT_MAX_TOKENS_CAP
    assert prepared.token_ids.itemsize == 4  # compact: array('i'), not a list of ints


@both_urls
def test_prepare_keeps_the_constraint_when_it_fits_max_tokens_to_the_context(url):
    text = "a" * 40
    body = {"prompt": text} if url == COMPLETIONS_URL else {"messages": [{"role": "user", "content": text}]}
    request = parse_body(url, {**body, "guided_choice": ["yes", "no"]})
    prepared = _prepare({**body, "guided_choice": ["yes", "no"]}, url)
    # The default max_tokens shrank to the room left (a dataclasses.replace of the params).
    assert prepared.params.max_tokens == (10 if url == COMPLETIONS_URL else 8) != request.params.max_tokens
    constraint = prepared.params.structured_outputs
    assert constraint.kind == "choice" and constraint.choice == ["yes", "no"] and constraint.llguidance_grammar


def test_prepare_window_keeps_order_and_mixes_errors():
    entries = [
        BatchEntry(1, "a", COMPLETIONS_URL, parse_body(COMPLETIONS_URL, {"prompt": "x" * 60})),
        BatchEntry(2, "b", CHAT_URL, parse_body(CHAT_URL, {"messages": [{"role": "user", "content": "q"}]})),
        BatchEntry(4, "c", COMPLETIONS_URL, parse_body(COMPLETIONS_URL, {"prompt": "yz"})),
    ]
    results = prepare_window(entries, PromptTokenizer(_Tokenizer(), 50))
    assert isinstance(results[0], LineError) and results[0].code == "context_length_exceeded"
    assert results[0].message.startswith("line 1: ") and results[0].custom_id == "a"
    assert [r.entry.custom_id for r in results[1:]] == ["b", "c"]
    assert results[2].token_ids.tolist() == [ord("y"), ord("z")]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": "a" * 50}, "context_length_exceeded"),
        ({"prompt": "a" * 10, "max_tokens": 41}, "context_length_exceeded"),
        ({"prompt": [5, 1000]}, "invalid_request"),
        ({"prompt": "a" * 45, "min_tokens": 8}, "invalid_request"),
    ],
)
def test_prepare_rejects_what_does_not_fit(body, code):
    result = _prepare(body)
    assert isinstance(result, LineError) and result.code == code and result.message.startswith("line 3: ")


def test_prepare_reports_chat_template_failures():
    class Broken(_Tokenizer):
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            if any(m["content"] == "bad" for m in messages if isinstance(m, dict)):
                raise ValueError("roles must alternate")
            return super().apply_chat_template(messages, tokenize, add_generation_prompt)

    entries = [
        BatchEntry(i + 1, str(i), CHAT_URL, parse_body(CHAT_URL, {"messages": [{"role": "user", "content": c}]}))
        for i, c in enumerate(["ok", "bad", "fine"])
    ]
    results = prepare_window(entries, PromptTokenizer(Broken(), 50))
    assert isinstance(results[1], LineError) and "roles must alternate" in results[1].message
    assert [r.token_ids.tolist() for r in (results[0], results[2])] == [[60, 111, 107, 62], [60, 102, 105, 110, 101, 62]]


# --- writer ---------------------------------------------------------------------------


def _output(logprobs: bool) -> RequestOutput:
    def position(chosen: int) -> dict[int, Logprob]:
        # The chosen token ranked 3rd: outside a top-2 request, as the engine reports it.
        return {10: Logprob(-0.1, 1, "A"), 11: Logprob(-1.0, 2, None), chosen: Logprob(-2.0, 3, None)}

    choices = [
        CompletionOutput(
            index=i,
            text="ab",
            token_ids=[12, 13],
            finish_reason="length",
            logprobs=[position(12), position(13)] if logprobs else None,
        )
        for i in range(2)
    ]
    return RequestOutput("r", None, [1, 2, 3], choices, num_cached_tokens=2)


def _token_text(token_id: int) -> str:
    return chr(ord("a") + token_id - 12) if token_id >= 12 else f"<{token_id}>"


def _check_usage(body: dict) -> None:
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_completion_body_has_the_openai_shape():
    body = completion_body(_output(logprobs=True), "served", 2, _token_text)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "served"
    _check_usage(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    choice = body["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert (choice["text"], choice["finish_reason"]) == ("ab", "length")
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-2.0, -2.0] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"][0] == {"A": -0.1, "<11>": -1.0, "a": -2.0}
    plain = completion_body(_output(logprobs=False), "served", None, _token_text)
    assert plain["choices"][0]["logprobs"] is None


def test_chat_body_has_the_openai_shape():
    body = chat_body(_output(logprobs=True), "served", 2, _token_text)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    _check_usage(body)
    choice = body["choices"][1]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"] == {"role": "assistant", "content": "ab"}
    first = choice["logprobs"]["content"][0]
    assert first == {
        "token": "a",
        "logprob": -2.0,
        "bytes": [97],
        "top_logprobs": [
            {"token": "A", "logprob": -0.1, "bytes": [65]},
            {"token": "<11>", "logprob": -1.0, "bytes": [60, 49, 49, 62]},
        ],
    }
    assert chat_body(_output(logprobs=False), "served", None, _token_text)["choices"][0]["logprobs"] is None


def test_writer_lines_have_the_batch_output_shape(tmp_path):
    path = tmp_path / "out.jsonl"
    with BatchWriter(path) as writer:
        writer.write_response("ok-1", {"x": 1})
        # Each line is on disk as soon as it is written, before close.
        assert len(path.read_text().splitlines()) == 1
        writer.write_error("bad-1", "invalid_request", "line 2: nope")
        writer.write_error(None, "invalid_json", "line 3: not valid JSON")
    ok, bad, anonymous = (json.loads(text) for text in path.read_text().splitlines())
    assert set(ok) == set(bad) == {"id", "custom_id", "response", "error"}
    assert ok["id"].startswith("batch_req_") and ok["id"] != bad["id"]
    assert ok["custom_id"] == "ok-1" and ok["error"] is None
    assert set(ok["response"]) == {"status_code", "request_id", "body"}
    assert ok["response"]["status_code"] == 200 and isinstance(ok["response"]["request_id"], str)
    assert ok["response"]["body"] == {"x": 1}
    assert bad["response"] is None
    assert bad["error"] == {"code": "invalid_request", "message": "line 2: nope", "retryable": False}
    assert anonymous["custom_id"] is None
    assert (writer.num_responses, writer.num_errors) == (1, 2)
    with BatchWriter(path, append=True) as writer:
        writer.write_response("ok-2", {})
    assert len(path.read_text().splitlines()) == 4


def test_writer_opens_its_file_only_when_it_writes(tmp_path):
    path = tmp_path / "errors.jsonl"
    with BatchWriter(path, fsync_interval=0.0):
        pass
    assert not path.exists()


# --- windows, ordering, resume ----------------------------------------------------------


def test_windows_hold_at_most_n_valid_entries_and_keep_errors_in_place():
    entries = list(parse_lines([line("a"), "junk", line("b"), line("c"), "junk", line("d")]))
    parts = list(windows(entries, 2))
    assert [[getattr(e, "custom_id", None) or e.line for e in part] for part in parts] == [
        ["a", 2, "b"], ["c", 5, "d"]
    ]
    assert list(windows([], 3)) == []


def test_ordered_writer_releases_in_order_and_spills_beyond_its_bound(tmp_path):
    from treebatch.batch.ordering import OrderedWriter

    path = tmp_path / "out.jsonl"
    writer = BatchWriter(path)
    ordered = OrderedWriter(writer, max_buffered=2)
    for seq in [5, 3, 4, 1]:  # 3 of them arrive early; the bound of 2 sends the rest to disk
        ordered.put(seq, f"{seq}\n")
    ordered.skip(2)
    assert ordered.num_spilled >= 1 and not path.exists()
    ordered.put(0, "0\n")
    assert path.read_text().split() == ["0", "1", "3", "4", "5"]
    assert ordered.num_waiting == 0 and ordered.next_seq == 6
    with pytest.raises(ValueError):
        ordered.put(3, "again\n")
    ordered.close()
    writer.close()


def test_resume_scan_drops_a_torn_tail_and_keys_errors_by_line(tmp_path):
    from treebatch.batch.resume import ResumeError, scan_finished

    out, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    with BatchWriter(out) as writer:
        writer.write_response("a", {"x": 1})
        writer.write_response("b", {"x": 2})
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "batch_req_1", "custom_id": "c", "resp')  # killed mid-line
    with BatchWriter(errors) as writer:
        writer.write_error(None, "invalid_json", "line 4: not valid JSON")
        writer.write_error("a", "duplicate_custom_id", "line 5: custom_id: duplicate 'a'")
        writer.write_error("m", "invalid_request", "line 6: method: must be 'POST'")
    finished = scan_finished([out, errors, tmp_path / "missing.jsonl"])
    assert out.read_bytes() == whole and finished.num_dropped_bytes > 0
    assert finished.custom_ids == {"a", "b", "m"} and finished.lines == {4, 5, 6}
    assert (finished.num_responses, finished.num_errors, finished.num_records) == (2, 3, 5)
    entries = list(parse_lines([line("a"), line("b"), line("c"), "junk", line("a"), line("m", method="GET")]))
    assert [finished.covers(e) for e in entries] == [True, True, False, True, True, True]
    # A broken line in the middle is not ours to guess about.
    out.write_bytes(b"garbage\n" + whole)
    with pytest.raises(ResumeError):
        scan_finished([out])
