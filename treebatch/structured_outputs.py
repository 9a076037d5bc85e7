"""Structured outputs: constrain a request's answer to a JSON schema, a regex, a choice of strings
or a Lark grammar, in vLLM's shape (`SamplingParams(structured_outputs=StructuredOutputsParams(
json=...))`).

A constraint becomes one llguidance grammar string (`grammar`): the engine compiles each distinct
string once and gives every sample of a constrained request its own matcher over it
(runtime/guidance.py). The constraint starts at the first generated token and ends the answer
when the grammar is complete (finish_reason "stop"); `max_tokens` may cut it first
(finish_reason "length", the text then incomplete, as with OpenAI).

`check` compiles the grammar without a tokenizer, so a bad schema, regex or grammar is found
when a request is made (a line error in a batch file, `treebatch plan` included), never
mid-run. Checks are cached by grammar: a labelling job's 100,000 lines share one schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# A schema, regex or grammar longer than this is refused: compiling it would be the job's cost.
MAX_CONSTRAINT_CHARS = 1 << 20
# JSON answers are laid out as Python's json.dumps does ('{"a": 1, "b": [2, 3]}'), no other
# whitespace: a model's likeliest layout, and one that makes every key and separator a forced
# token (jump-forward). A schema's own "x-guidance" options override it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A structured-output constraint that cannot be compiled; the message says why, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message.strip()))


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `regex`, `choice` (a list of
    strings; the answer is one of them, exactly), `grammar` (Lark syntax, llguidance's dialect),
    `json_object=True` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    _grammar: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ConstraintError(
                f"structured outputs take exactly one of json, regex, choice, grammar, json_object; got {given or 'none'}"
            )
        self._grammar = _to_grammar(self)
        check(self._grammar)

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def llguidance_grammar(self) -> str:
        """The constraint as one llguidance grammar (the key its compiled form is cached by)."""
        return self._grammar


def _to_grammar(params: StructuredOutputsParams) -> str:
    from llguidance import LLMatcher

    if params.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            _check_size("json", schema)
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ConstraintError(f"json: the schema is not valid JSON ({exc})") from exc
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"json: a schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema, ensure_ascii=False)
        _check_size("json", text)
        try:
            return LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        except ValueError as exc:
            raise ConstraintError(f"json: {exc}") from exc
    if params.regex is not None:
        if not isinstance(params.regex, str):
            raise ConstraintError(f"regex: must be a string, got {type(params.regex).__name__}")
        _check_size("regex", params.regex)
        return LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        choices = params.choice
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choice: must be a non-empty list of non-empty strings")
        _check_size("choice", "".join(choices))
        # A regex of the literal choices: its lexer sees every choice's bytes at once, so the
        # forced rest of a choice after its first tokens is known (jump-forward).
        return LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in choices))
    assert params.grammar is not None
    if not isinstance(params.grammar, str) or not params.grammar.strip():
        raise ConstraintError("grammar: must be a non-empty Lark grammar")
    _check_size("grammar", params.grammar)
    return LLMatcher.grammar_from_lark(params.grammar)


def _check_size(kind: str, text: str) -> None:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"{kind}: longer than {MAX_CONSTRAINT_CHARS} characters")


@lru_cache(maxsize=1024)
def check(grammar: str) -> None:
    """Compile `grammar` (without a tokenizer); raise ConstraintError naming what is wrong."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConstraintError(messages[0] if messages else "the grammar does not compile")
