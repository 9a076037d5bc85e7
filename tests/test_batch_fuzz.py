"""Property tests of the Batch-file reader: whatever bytes a line holds, reading never raises.

The reader's contract (treebatch/batch/reader.py): a file is split into lines at b"\\n" only (a bare
CR is not a line end: it stays inside its line, where JSON reads it as whitespace or rejects it);
a line is blank when it is whitespace once decoded as UTF-8 (a byte-order mark before line 1
dropped) and yields nothing; every other line yields exactly one record, in file order: a
`BatchEntry` or a `LineError` whose message starts with "line N: " and says why. `count_lines`
counts those same lines. An entry holds only strings that encode to UTF-8, so the tokenizer and
the output writer take it as it is; `prepare_window` and `analyze_batch` then never raise either,
and a whole `treebatch run` (on a fake engine) writes exactly one record per line and, rerun,
finds nothing left to do.

Lines come from hypothesis: raw bytes, and OpenAI Batch request lines built field by field with
valid values, wrong types, missing and extra fields, huge, negative and non-finite numbers, lone
surrogates (as `\\ud800` escapes and as raw code points), non-UTF-8 bytes, NUL bytes, deep
nesting, CRLF and bare CR line ends, blank lines and duplicate custom_ids.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treebatch.batch.plan import analyze_batch
from treebatch.batch.prompts import PreparedRequest, PromptTokenizer, prepare_window
from treebatch.batch.reader import BatchEntry, LineError, count_lines, parse_lines, read_batch
from treebatch.batch.requests import CHAT_URL, COMPLETIONS_URL, ParsedRequest
from treebatch.batch.writer import error_line

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CODES = {
    "invalid_json", "invalid_request", "missing_custom_id", "duplicate_custom_id", "unsupported_url",
    "context_length_exceeded",
}


class StrictTokenizer:
    """One token per UTF-8 byte, and like the Rust tokenizers it refuses a text that is not
    valid Unicode (a lone surrogate): TypeError, where the real one says 'TextEncodeInput must be ...'."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [([1] if add_special_tokens else []) + list(_utf8(t)) for t in texts]}

    def apply_chat_template(self, conversations, tokenize: bool = False, add_generation_prompt: bool = True):
        if conversations and isinstance(conversations[0], list):
            return [self.apply_chat_template(c) for c in conversations]
        return "".join(f"<{m['role']}>{m['content']}" for m in conversations) + "<assistant>"

    def __len__(self) -> int:
        return 257


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")


# --- the oracle ---------------------------------------------------------------------------


def expected_lines(lines: list[bytes | str]) -> list[int]:
    """1-based numbers of the lines that must each yield one record (the reader's contract)."""
    numbers = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                numbers.append(number)  # an error record: not valid UTF-8
                continue
        else:
            text = raw
        if number == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            numbers.append(number)
    return numbers


def file_lines(data: bytes) -> list[bytes]:
    """The lines a binary file iterates as (split after each b"\\n")."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


def _strings(value: object) -> list[str]:
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            found.extend(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def check_records(lines: list[bytes | str], records: list[BatchEntry | LineError]) -> None:
    assert [r.line for r in records] == expected_lines(lines)
    ids = [r.custom_id for r in records if isinstance(r, BatchEntry)]
    assert len(ids) == len(set(ids)), "an accepted custom_id repeats"
    for record in records:
        if isinstance(record, LineError):
            prefix = f"line {record.line}: "
            assert record.message.startswith(prefix) and len(record.message) > len(prefix) + 3
            assert record.code in CODES
            assert record.custom_id is None or (isinstance(record.custom_id, str) and record.custom_id)
            error_line(record.custom_id, record.code, record.message).encode("utf-8")  # writable
        else:
            assert isinstance(record, BatchEntry) and isinstance(record.request, ParsedRequest)
            assert isinstance(record.custom_id, str) and record.custom_id
            assert record.url in (COMPLETIONS_URL, CHAT_URL) and record.url == record.request.url
            request = record.request
            assert (request.prompt is None) != (request.messages is None)
            params = request.params
            texts = [record.custom_id, *_strings(request.prompt), *_strings(request.messages), *params.stop_strings]
            if request.model is not None:
                texts.append(request.model)
            for text in texts:
                text.encode("utf-8")  # no lone surrogate reaches the tokenizer or the writer
    entries = [r for r in records if isinstance(r, BatchEntry)]
    prepared = prepare_window(entries, PromptTokenizer(StrictTokenizer(), 64))
    assert len(prepared) == len(entries)
    for entry, result in zip(entries, prepared):
        assert result.line == entry.line if isinstance(result, LineError) else result.entry is entry
        assert isinstance(result, (PreparedRequest, LineError))


# --- strategies ---------------------------------------------------------------------------

# Text with every code point, lone surrogates included (st.text leaves those out).
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
specials = st.sampled_from("\x00\r\n\t\u2028\ufeff\\\"")
# A character: 1 in 12 a lone surrogate, 1 in 12 one that JSON or line splitting treats specially.
any_char = st.tuples(st.integers(0, 11), st.characters(), surrogates, specials).map(lambda t: (t[2], t[3])[t[0]] if t[0] < 2 else t[1])
any_text = st.lists(any_char, max_size=8).map("".join)
huge_ints = st.one_of(
    st.integers(),
    st.sampled_from([-1, 0, 2**31, 2**63, -(2**63) - 1, 2**64, 10**400, -(10**400)]),
)
numbers = st.one_of(huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 5e-324]))
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)), max_leaves=6
)
small_text = st.text(max_size=12)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]), json_values),
            "content": st.one_of(
                small_text,
                any_text,
                st.lists(
                    st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(small_text, any_text)}), json_values),
                    max_size=3,
                ),
                json_values,
            ),
        },
    ),
    max_size=3,
)
VALID = {
    "prompt": st.one_of(small_text, any_text, st.lists(huge_ints, max_size=4), st.lists(small_text, max_size=2)),
    "messages": messages,
    "max_tokens": st.integers(-2, 100),
    "max_completion_tokens": st.integers(-2, 100),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 200),
    "best_of": st.integers(-1, 200),
    "stop": st.one_of(small_text, any_text, st.lists(st.one_of(small_text, any_text), max_size=3)),
    "seed": huge_ints,
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": numbers,
    "top_k": huge_ints,
    "min_p": st.floats(-1, 2),
    "min_tokens": st.integers(-1, 200),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 30)),
    "top_logprobs": st.integers(-1, 30),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stop_token_ids": st.lists(huge_ints, max_size=3),
    "response_format": st.one_of(st.just({"type": "text"}), json_values),
    "model": st.one_of(small_text, any_text),
    "user": any_text,
    "metadata": json_values,
    "stream": st.sampled_from([False, True, None]),
    "echo": st.sampled_from([False, True]),
    "suffix": st.sampled_from(["", "x"]),
    "logit_bias": st.one_of(st.just({}), json_values),
    "tools": st.one_of(st.just([]), json_values),
}
bodies = st.tuples(
    st.fixed_dictionaries({}, optional={name: st.one_of(valid, valid, json_values) for name, valid in VALID.items()}),
    st.dictionaries(st.one_of(small_text, any_text), json_values, max_size=2),  # extra fields
).map(lambda parts: {**parts[0], **parts[1]})
random_records = st.tuples(
    st.fixed_dictionaries(
        {},
        optional={
            "custom_id": st.one_of(st.sampled_from(["a", "b", "req-1", "\u00e9t\u00e9"]), any_text, json_values),
            "method": st.one_of(st.just("POST"), st.just("POST"), json_values),
            "url": st.one_of(st.sampled_from([COMPLETIONS_URL, CHAT_URL]), json_values),
            "body": st.one_of(bodies, bodies, bodies, json_values),
        },
    ),
    st.dictionaries(any_text, json_values, max_size=2),
).map(lambda parts: {**parts[1], **parts[0]})
chat_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant"]),
            "content": st.one_of(small_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": small_text}), max_size=2)),
        }
    ),
    min_size=1,
    max_size=3,
)
OPTIONAL = sorted(set(VALID) - {"prompt", "messages"})


@st.composite
def plausible_records(draw) -> dict:
    """A request line close to valid: the right skeleton, a few fields near their limits, and
    sometimes one field wrong, missing or extra; many of these are accepted."""
    url = draw(st.sampled_from([COMPLETIONS_URL, CHAT_URL]))
    body = {"messages": draw(chat_messages)} if url == CHAT_URL else {"prompt": draw(VALID["prompt"])}
    for name in draw(st.lists(st.sampled_from(OPTIONAL), max_size=3, unique=True)):
        body[name] = draw(VALID[name])
    if draw(st.integers(0, 3)) == 0:
        body[draw(st.one_of(st.sampled_from(sorted(VALID)), any_text))] = draw(json_values)
    record = {
        "custom_id": draw(st.one_of(st.text("abcdef-0123456789", min_size=1, max_size=4), any_text)),
        "method": "POST",
        "url": url,
        "body": body,
    }
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=1)) if draw(st.integers(0, 5)) == 0 else []:
        del record[key]
    return record


records = st.one_of(plausible_records(), plausible_records(), random_records)


def _deep(depth: int) -> str:
    return '{"custom_id": "deep", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "metadata": ' + (
        "[" * depth + "]" * depth
    ) + "}}"


@st.composite
def request_lines(draw) -> bytes:
    """One line: a JSON-encoded record, sometimes damaged on the way to bytes."""
    text = json.dumps(draw(records), ensure_ascii=draw(st.integers(0, 3)) > 0)
    damage = draw(st.sampled_from(["none"] * 14 + ["nul", "cr", "cut", "digits", "deep", "bom"]))
    if damage == "nul":
        i = draw(st.integers(0, len(text)))
        text = text[:i] + "\x00" + text[i:]
    elif damage == "cr":
        i = draw(st.integers(0, len(text)))
        text = text[:i] + "\r" + text[i:]
    elif damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "digits":
        digits = "9" * draw(st.sampled_from([4300, 4301, 10000]))
        text = '{"custom_id": "big", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "seed": -' + digits + "}}"
    elif damage == "deep":
        text = _deep(draw(st.sampled_from([50, 900, 995, 1000, 3000])))
    elif damage == "bom":
        text = "\ufeff" + text
    # With ensure_ascii=False a lone surrogate is written out raw: not UTF-8 (as CESU-8 writers produce)
    return text.encode("utf-8", "surrogatepass")


blank_lines = st.sampled_from([b"", b"   ", b"\t", b"\r", "\u00a0".encode(), "\u2028".encode(), b"\x1c", b"\xef\xbb\xbf"])
line_ends = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"])


@st.composite
def files(draw, lines=request_lines()) -> bytes:
    parts = draw(st.lists(st.one_of(lines, lines, lines, blank_lines), max_size=8))
    data = b"".join(part + draw(line_ends) for part in parts)
    return data if draw(st.booleans()) else data.rstrip(b"\n")


def read_file(tmp_path: Path, data: bytes) -> tuple[list[bytes], list[BatchEntry | LineError]]:
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    records = list(read_batch(path))
    assert count_lines(path) == len(records)  # the progress total is the number of output records
    return file_lines(data), records


# --- properties ---------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_random_byte_lines_each_answered_or_reported(lines):
    check_records(lines, list(parse_lines(lines)))


@settings(FUZZ, max_examples=300)
@given(st.lists(st.text(st.characters(), max_size=30) | any_text, max_size=6))
def test_random_text_lines_each_answered_or_reported(lines):
    check_records(lines, list(parse_lines(lines)))


@settings(FUZZ, max_examples=350)
@given(st.lists(request_lines(), min_size=1, max_size=6))
def test_request_lines_each_answered_or_reported(lines):
    check_records(lines, list(parse_lines(lines)))


@settings(FUZZ, max_examples=150)
@given(st.lists(records, min_size=1, max_size=6))
def test_request_lines_as_text_each_answered_or_reported(items):
    # str lines, as a caller of parse_lines may pass: a lone surrogate arrives raw, not escaped
    lines = [json.dumps(item, ensure_ascii=False) for item in items]
    check_records(lines, list(parse_lines(lines)))


@settings(FUZZ, max_examples=200)
@given(data=st.one_of(files(), files(st.binary(max_size=30))))
def test_whole_files_each_line_answered_or_reported(tmp_path_factory, data):
    lines, records = read_file(tmp_path_factory.mktemp("fuzz"), data)
    check_records(lines, records)


@settings(FUZZ, max_examples=60)
@given(data=files())
def test_a_whole_job_on_a_generated_file_writes_one_record_per_line_and_resumes_to_nothing(tmp_path_factory, data):
    from test_cli import FakeLLM  # the engine's interface, answering at once

    from treebatch import cli

    folder = tmp_path_factory.mktemp("job")
    source, target = folder / "in.jsonl", folder / "out.jsonl"
    source.write_bytes(data)
    made: list[FakeLLM] = []
    factory = lambda **options: made.append(FakeLLM(**options)) or made[-1]  # noqa: E731
    status = cli.main(["run", str(source), "-o", str(target), "--window", "3"], llm_factory=factory)
    assert status == 0
    written = [json.loads(line) for path in (target, folder / "out.errors.jsonl") if path.exists()
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(written) == count_lines(source)  # each line answered or reported, exactly once
    answered = [r["custom_id"] for r in written if r["error"] is None]
    assert len(answered) == len(set(answered))
    assert all(r["error"]["message"].startswith("line ") for r in written if r["error"] is not None)
    before = [path.read_bytes() for path in (target, folder / "out.errors.jsonl") if path.exists()]
    assert cli.main(["run", str(source), "-o", str(target), "--window", "3"], llm_factory=factory) == 0
    assert [path.read_bytes() for path in (target, folder / "out.errors.jsonl") if path.exists()] == before
    assert all(not llm.calls for llm in made[1:])  # the rerun had nothing left to answer

@settings(FUZZ, max_examples=60)
@given(data=files())
def test_plan_of_a_generated_file_never_raises(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("plan") / "in.jsonl"
    path.write_bytes(data)
    records = list(read_batch(path))
    analysis = analyze_batch(path, PromptTokenizer(StrictTokenizer(), 64), window=3)
    assert analysis["lines"] == len(records) == analysis["valid"] + analysis["invalid"]
    assert analysis["valid"] == analysis["requests"]
    assert sum(analysis["errors_by_code"].values()) == analysis["invalid"]
    json.dumps(analysis, ensure_ascii=False).encode("utf-8")


# --- what these tests found, pinned ---------------------------------------------------


def _line(body: object, custom_id: object = "x", url: str = COMPLETIONS_URL) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_is_a_line_error(depth):
    (record,) = parse_lines([_deep(depth)])
    assert isinstance(record, LineError) and record.message == "line 1: JSON nests too deeply"


def test_deep_nesting_reports_the_line():
    records = list(parse_lines([_line({"prompt": "a"}, "a"), _deep(100_000), _line({"prompt": "b"}, "b")]))
    assert [type(r) for r in records] == [BatchEntry, LineError, BatchEntry]
    assert records[1].message == "line 2: JSON nests too deeply" and records[1].code == "invalid_json"


def test_a_number_with_too_many_digits_is_a_line_error():
    digits = sys.get_int_max_str_digits() + 1
    (record,) = parse_lines(['{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"seed": ' + "9" * digits + "}}"])
    assert isinstance(record, LineError) and record.code == "invalid_json"
    assert record.message.startswith("line 1: not valid JSON (a number has more than")


@pytest.mark.parametrize("value", ["1" + "0" * 400, "1e400", "Infinity", "-Infinity", "NaN"])
def test_a_number_out_of_float_range_is_a_line_error(value):
    text = _line({"prompt": "x"}).replace('"prompt": "x"', f'"prompt": "x", "repetition_penalty": {value}')
    (record,) = parse_lines([text])
    assert isinstance(record, LineError) and record.message.startswith("line 1: body.repetition_penalty: ")
    assert record.custom_id == "x"


@pytest.mark.parametrize(
    "body, url, where",
    [
        ({"prompt": "a\ud800b"}, COMPLETIONS_URL, "body.prompt"),
        ({"prompt": ["\udfff"]}, COMPLETIONS_URL, "body.prompt[0]"),
        ({"prompt": "a", "stop": ["\n", "\udc00"]}, COMPLETIONS_URL, "body.stop[1]"),
        ({"prompt": "a", "model": "m\ud83d"}, COMPLETIONS_URL, "body.model"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, CHAT_URL, "body.messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}]}, CHAT_URL,
         "body.messages[0].content[0].text"),
    ],
)
def test_a_lone_surrogate_is_a_line_error_naming_the_field(body, url, where):
    text = _line(body, url=url)
    assert "\\ud" in text  # json.dumps writes the lone surrogate as an escape
    for raw in (text, text.encode()):
        (record,) = parse_lines([raw])
        assert isinstance(record, LineError) and record.custom_id == "x"
        assert record.message.startswith(f"line 1: {where}: not valid Unicode (lone surrogate \\u")


def test_a_lone_surrogate_in_the_custom_id_leaves_it_unnamed():
    (record,) = parse_lines([_line({"prompt": "a"}, custom_id="id\udc80")])
    assert isinstance(record, LineError) and record.custom_id is None
    assert record.message.startswith("line 1: custom_id: not valid Unicode (lone surrogate \\udc80)")
    error_line(record.custom_id, record.code, record.message).encode("utf-8")


def test_a_surrogate_pair_is_one_character_and_accepted():
    (record,) = parse_lines(['{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\\ud83d\\ude00"}}'])
    assert isinstance(record, BatchEntry) and record.request.prompt == "\U0001f600"


def test_a_lone_surrogate_keeps_its_custom_id_claimed():
    records = list(parse_lines([_line({"prompt": "\ud800"}, "a"), _line({"prompt": "ok"}, "a")]))
    assert [r.code for r in records] == ["invalid_request", "duplicate_custom_id"]


def test_blank_lines_by_unicode_whitespace_are_not_counted(tmp_path):
    data = "\ufeff\n\u00a0\n \u2028 \r\n\x1c\n".encode() + _line({"prompt": "a"}).encode() + b"\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    records = list(read_batch(path))
    assert [r.line for r in records] == [5]
    assert count_lines(path) == 1


# --- the real tokenizer: a whole nasty file through the plan ---------------------------------


@pytest.fixture(scope="module")
def real_tokenizer():
    try:
        from treebatch.tokenizer import load_tokenizer_only

        loaded = load_tokenizer_only()
    except Exception as exc:  # no default model on this machine
        pytest.skip(f"default tokenizer not available: {exc}")
    return PromptTokenizer.of(loaded)


@settings(FUZZ, max_examples=10)
@given(data=files())
def test_plan_with_the_real_tokenizer_never_raises(tmp_path_factory, real_tokenizer, data):
    nasty = [
        _line({"prompt": "a\ud800"}, "s1"),
        _line({"messages": [{"role": "user", "content": "\udfff"}]}, "s2", CHAT_URL),
        _line({"prompt": "nul \x00 inside"}, "n1"),
        _line({"messages": [{"role": "assistant", "content": "x"}, {"role": "system", "content": "y"}]}, "o1", CHAT_URL),
        _deep(5000),
    ]
    path = tmp_path_factory.mktemp("plan") / "in.jsonl"
    path.write_bytes(data + b"\n" + "\r\n".join(nasty).encode("utf-8") + b"\n")
    analysis = analyze_batch(path, real_tokenizer, window=4)
    assert analysis["lines"] == len(list(read_batch(path))) == analysis["valid"] + analysis["invalid"]
    assert analysis["valid"] == analysis["requests"]
