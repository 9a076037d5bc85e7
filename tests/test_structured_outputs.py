"""Structured outputs with the default model: at temperature 1.0 (random sampling, the hard case)
every finished answer obeys its constraint, checked by an independent judge: `jsonschema` for
JSON schemas, `re.fullmatch` for regexes, membership for choices, Python's own parser for a Lark
grammar of arithmetic. Also: jump-forward changes nothing but the step count, prefix sharing and
`n > 1` keep working, unconstrained neighbours are untouched, bad constraints are refused."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest

from treebatch import LLM, SamplingParams
from treebatch.structured_outputs import ConstraintError, StructuredOutputsParams

pytestmark = pytest.mark.slow

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {  # nested objects, arrays with bounds, enums, numbers with bounds
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1000, "maximum": 9999},
            "status": {"enum": ["open", "paid", "shipped"]},
            "items": {
                "type": "array", "minItems": 1, "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "maxLength": 8}, "price": {"type": "number", "minimum": 0, "maximum": 500}},
                    "required": ["sku", "price"],
                    "additionalProperties": False,
                },
            },
            "gift": {"type": "boolean"},
        },
        "required": ["id", "status", "items"],
        "additionalProperties": False,
    },
    "labels": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "topics": {"type": "array", "items": {"enum": ["sports", "music", "food", "travel"]}, "maxItems": 2},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["sentiment", "topics", "score"],
        "additionalProperties": False,
    },
}
CHOICES = ["positive", "negative", "neutral", "mixed", "not applicable"]
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
ARITHMETIC = r"""
start: expr
expr: operand | operand OP operand | operand OP operand OP operand
operand: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*" | "/"
NUMBER: /[1-9][0-9]{0,2}/
"""  # a finite language: every answer completes within max_tokens
TEXTS = ["The trip to Rome was wonderful, the pasta unforgettable.", "My order arrived broken and late.",
         "The match ended in a draw.", "I keep listening to this album.", "Customer Jane, 34, wrote in.",
         "Invoice for three items, paid by card.", "Nothing much happened today.", "Best concert of the year!"]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _sample(llm, prompts, constraint, n=1, max_tokens=80, **options):
    params = SamplingParams(temperature=1.0, n=n, seed=7, max_tokens=max_tokens,
                            structured_outputs=constraint, **options)
    return [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


def _finished(choices, fraction=0.9):
    """The answers the grammar completed (those max_tokens cut are incomplete by design); at
    least `fraction` of them must be."""
    done = [c for c in choices if c.finish_reason == "stop"]
    assert len(done) >= fraction * len(choices), [c.text for c in choices if c.finish_reason != "stop"]
    return done


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_json_answer_validates_against_its_schema(llm, name):
    schema = SCHEMAS[name]
    prompts = [f"{text}\nAs JSON ({name}):" for text in TEXTS]
    choices = _sample(llm, prompts, StructuredOutputsParams(json=schema), n=6, max_tokens=120)
    assert len(choices) == 48
    for choice in _finished(choices):
        jsonschema.validate(json.loads(choice.text), schema)


def test_json_object_answers_are_objects(llm):
    # Any object at temperature 1.0 may ramble inside a string past max_tokens: half must finish.
    for choice in _finished(_sample(llm, TEXTS, StructuredOutputsParams(json_object=True), n=3, max_tokens=60), 0.5):
        assert isinstance(json.loads(choice.text), dict)


def test_choices_are_always_one_of_the_choices(llm):
    prompts = [f"Review: {text}\nSentiment:" for text in TEXTS]
    choices = _sample(llm, prompts, StructuredOutputsParams(choice=CHOICES), n=8)
    assert len(choices) == 64 and all(c.finish_reason == "stop" for c in choices)
    assert all(c.text in CHOICES for c in choices)
    assert len({c.text for c in choices}) > 1  # sampled, not stuck on one


def test_regex_answers_fullmatch(llm):
    prompts = [f"{text}\nDate:" for text in TEXTS]
    choices = _sample(llm, prompts, StructuredOutputsParams(regex=REGEX), n=6)
    assert all(c.finish_reason == "stop" and re.fullmatch(REGEX, c.text) for c in choices), [c.text for c in choices]


def test_lark_grammar_answers_parse(llm):
    prompts = [f"Exercise {i}: write an arithmetic expression.\n" for i in range(8)]
    choices = _sample(llm, prompts, StructuredOutputsParams(grammar=ARITHMETIC), n=5, max_tokens=40)
    assert all(c.finish_reason == "stop" for c in choices)
    for choice in choices:
        tree = ast.parse(choice.text, mode="eval")  # Python's own parser is the judge
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), choice.text
        assert " " not in choice.text


def test_max_tokens_cuts_an_answer_as_length(llm):
    choices = _sample(llm, TEXTS[:2], StructuredOutputsParams(json=SCHEMAS["order"]), max_tokens=5)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 5 for c in choices)


def test_jump_forward_saves_steps_and_changes_no_greedy_answer(llm):
    prompts = [f"{text}\nAs JSON:" for text in TEXTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMAS["person"]))
    runs = {}
    for jump, engine in ((True, llm), (False, LLM(dtype="float32", enable_jump_forward=False))):
        outputs = engine.generate(prompts, params, use_tqdm=False)
        runs[jump] = ([o.outputs[0].text for o in outputs], engine.last_run_summary)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1]["forced_tokens"] > 0 and runs[False][1]["forced_tokens"] == 0
    assert runs[True][1]["steps"] < runs[False][1]["steps"]
    assert runs[True][1]["generated_tokens"] == runs[False][1]["generated_tokens"]


def test_a_shared_prefix_and_unconstrained_neighbours_are_untouched(llm):
    few_shot = "Label each review as positive, negative or neutral.\n" + "".join(
        f"Review: {t}\nLabel: neutral\n\n" for t in TEXTS[:4]
    )
    prompts = [f"{few_shot}Review: {t}\nLabel:" for t in TEXTS]
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    label = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=CHOICES[:3]))
    mixed = llm.generate(prompts + prompts, [label] * len(prompts) + [plain] * len(prompts), use_tqdm=False)
    assert llm.last_run_summary["groups"] > 0  # the few-shot prefix is computed once
    alone = llm.generate(prompts, plain, use_tqdm=False)
    assert [o.outputs[0].text for o in mixed[len(prompts):]] == [o.outputs[0].text for o in alone]
    assert all(o.outputs[0].text in CHOICES[:3] for o in mixed[: len(prompts)])
    unshared = LLM(dtype="float32", enable_prefix_sharing=False).generate(prompts, label, use_tqdm=False)
    assert [o.outputs[0].text for o in unshared] == [o.outputs[0].text for o in mixed[: len(prompts)]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of"),
        ({"regex": "a", "choice": ["b"]}, "exactly one of"),
        ({"regex": "("}, "unclosed group"),
        ({"grammar": "start: missing_rule"}, "unknown name"),
        ({"json": {"type": "frobnicate"}}, "frobnicate"),
        ({"json": {"type": "array", "uniqueItems": True}}, "Unimplemented keys"),  # refused, not ignored
        ({"json": "{not json"}, "not valid JSON"),
        ({"choice": []}, "non-empty list"),
    ],
)
def test_bad_constraints_are_refused_on_one_line(fields, message):
    with pytest.raises(ConstraintError, match=message) as info:
        StructuredOutputsParams(**fields)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        SamplingParams(structured_outputs=fields)


def test_a_batch_file_mixing_constrained_unconstrained_and_bad_lines(llm, tmp_path, capsys):
    from treebatch import cli

    def line(custom_id, url, body):
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})

    chat, completions = "/v1/chat/completions", "/v1/completions"
    ask = [{"role": "user", "content": "Describe an order as JSON."}]
    schema = SCHEMAS["order"]
    lines = [
        line("schema", chat, {"messages": ask, "max_tokens": 120, "seed": 1,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}}),
        line("object", chat, {"messages": ask, "max_tokens": 80, "temperature": 0, "response_format": {"type": "json_object"}}),
        line("choice", completions, {"prompt": "Review: lovely.\nSentiment:", "max_tokens": 8, "guided_choice": CHOICES, "n": 3}),
        line("regex", completions, {"prompt": "A date:", "max_tokens": 16, "structured_outputs": {"regex": REGEX}}),
        line("grammar", completions, {"prompt": "A sum:", "max_tokens": 24, "guided_grammar": ARITHMETIC}),
        line("plain", completions, {"prompt": "Hello", "max_tokens": 4}),
        line("bad-regex", completions, {"prompt": "x", "guided_regex": "(unclosed"}),
        line("bad-schema", chat, {"messages": ask, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}}),
        line("two", completions, {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert cli.main(["run", str(source), "-o", str(target)], llm_factory=lambda **options: llm) == 0
    answers = {r["custom_id"]: r["response"]["body"]["choices"] for r in map(json.loads, target.read_text().splitlines())}
    errors = {r["custom_id"]: r["error"] for r in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())}
    assert sorted(answers) == ["choice", "grammar", "object", "plain", "regex", "schema"]
    assert sorted(errors) == ["bad-regex", "bad-schema", "two"]  # every custom_id once
    assert errors["bad-regex"]["code"] == errors["bad-schema"]["code"] == "invalid_constraint"
    assert "line 7: body.guided_regex:" in errors["bad-regex"]["message"] and "frobnicate" in errors["bad-schema"]["message"]
    assert "conflicts" in errors["two"]["message"]
    finished = [c for c in answers["schema"] if c["finish_reason"] == "stop"]
    for choice in finished:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert isinstance(json.loads(answers["object"][0]["message"]["content"]), dict)
    assert len(answers["choice"]) == 3 and all(c["text"] in CHOICES for c in answers["choice"])
    assert re.fullmatch(REGEX, answers["regex"][0]["text"])
    ast.parse(answers["grammar"][0]["text"], mode="eval")
