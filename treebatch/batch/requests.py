"""Map an OpenAI request body to a prompt and SamplingParams, validating every field.

Parsing needs no model, so a whole input file is checked before anything loads;
`treebatch.batch.prompts` then tokenizes parsed requests (chat templates, context checks).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from treebatch.inputs import ContextLengthError, fit_max_tokens
from treebatch.sampling_params import SamplingParams
from treebatch.structured_outputs import StructuredOutputsParams
from treebatch.tokenizer import check_chat_template_kwargs

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
SUPPORTED_URLS = (COMPLETIONS_URL, CHAT_URL)

# OpenAI's default for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Chat defaults to "up to the context"; a small model that never emits EOS would
# otherwise fill a long context for every such request, so the default stops here.
CHAT_DEFAULT_MAX_TOKENS_CAP = 4096
MAX_N = 128
MAX_TOP_LOGPROBS = 20
_FLOAT_MAX = sys.float_info.max

# Fields that change nothing for an offline batch: accepted and ignored.
_IGNORED_FIELDS = frozenset(
    {"model", "user", "metadata", "store", "service_tier", "stream_options", "reasoning_effort"}
)
# Fields we cannot honour: accepted only when they ask for the default behaviour.
_DEFAULT_ONLY_FIELDS: dict[str, tuple[Any, ...]] = {
    "stream": (None, False),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    # vLLM's whitespace pattern for JSON answers: treebatch lays JSON out one fixed way
    # (treebatch/structured_outputs.py, JSON_LAYOUT), so any pattern is refused, never ignored.
    "guided_whitespace_pattern": (None,),
}
_SAMPLING_FIELDS = frozenset(
    {
        "max_tokens", "temperature", "top_p", "n", "stop", "seed",
        "presence_penalty", "frequency_penalty", "top_k", "min_p", "min_tokens",
        "ignore_eos", "repetition_penalty", "stop_token_ids", "skip_special_tokens",
        "include_stop_str_in_output",
        # Structured outputs (see `_structured_outputs`), on both endpoints as in vLLM.
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "guided_decoding_backend",
    }
)
_COMPLETIONS_FIELDS = _SAMPLING_FIELDS | {"prompt", "logprobs", "best_of"}
_CHAT_FIELDS = _SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs",
    "chat_template_kwargs",  # vLLM's extension: extra template variables (Qwen3's enable_thinking)
}
# The kinds of constraint StructuredOutputsParams takes (its field names), and vLLM's older
# top-level field for each but json_object (which OpenAI's response_format gives).
_CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# An error from compiling a constraint can quote it; a record keeps this much of the message.
_MAX_CONSTRAINT_MESSAGE = 1000
_CHAT_ROLES = ("system", "developer", "user", "assistant")


class RequestError(ValueError):
    """An invalid request; `code` is the OpenAI-style error code for the output line."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated body. Exactly one of `prompt` (completions) or `messages` (chat) is set."""

    url: str
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    # Completions: the requested number of alternatives. Chat: top_logprobs (0 when
    # only `logprobs: true`). None: no logprobs in the response.
    logprobs: int | None = None
    model: str | None = None
    max_tokens_given: bool = False  # False: the default may be shortened to fit the context
    # Chat: extra chat-template variables, e.g. {"enable_thinking": False}; None when none.
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def is_chat(self) -> bool:
        return self.url == CHAT_URL


def parse_body(url: str, body: dict[str, Any]) -> ParsedRequest:
    """Validate `body` for `url`; raise RequestError naming the offending field."""
    if url == COMPLETIONS_URL:
        return _parse_completions(body)
    if url == CHAT_URL:
        return _parse_chat(body)
    raise RequestError(f"unsupported url {url!r}; use one of {', '.join(SUPPORTED_URLS)}")


def fit_context(request: ParsedRequest, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """The final params of a request whose prompt has `num_prompt_tokens`: a default max_tokens
    shrinks to the room left in the context (the rule of `treebatch.inputs.fit_max_tokens`, which
    `LLM.generate` applies too); an explicit one that does not fit is an error."""
    params = request.params
    wanted = params.max_tokens
    try:
        if request.max_tokens_given:
            fit_max_tokens(num_prompt_tokens, max_model_len, wanted, strict=True)
            return params
        limit = fit_max_tokens(
            num_prompt_tokens, max_model_len, CHAT_DEFAULT_MAX_TOKENS_CAP if wanted is None else wanted
        )
    except ContextLengthError as exc:
        raise RequestError(str(exc), code=exc.code) from exc
    if limit == wanted:
        return params
    try:
        return dataclasses.replace(params, max_tokens=limit)
    except ValueError as exc:  # e.g. min_tokens no longer fits
        raise RequestError(str(exc)) from exc


def _parse_completions(body: dict[str, Any]) -> ParsedRequest:
    _check_fields(body, _COMPLETIONS_FIELDS)
    prompt = _completion_prompt(body.get("prompt"))
    logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    n = _int(body, "n", 1, MAX_N)
    best_of = _int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of > (n or 1):
        raise RequestError("best_of: only best_of <= n is supported")
    max_tokens = _int(body, "max_tokens", 1, None)
    params = _sampling_params(
        body, COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, logprobs
    )
    return ParsedRequest(
        url=COMPLETIONS_URL,
        params=params,
        prompt=prompt,
        logprobs=logprobs,
        model=_model(body),
        max_tokens_given=max_tokens is not None,
    )


def _parse_chat(body: dict[str, Any]) -> ParsedRequest:
    _check_fields(body, _CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    max_tokens = _int(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, None)
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise RequestError("top_logprobs: requires logprobs to be true")
    logprobs = (top or 0) if want_logprobs else None
    return ParsedRequest(
        url=CHAT_URL,
        params=_sampling_params(body, max_tokens, logprobs),
        messages=messages,
        logprobs=logprobs,
        model=_model(body),
        max_tokens_given=max_tokens is not None,
        chat_template_kwargs=_chat_template_kwargs(body.get("chat_template_kwargs")),
    )


def _chat_template_kwargs(value: Any) -> dict[str, Any] | None:
    try:
        kwargs = check_chat_template_kwargs(value)
    except ValueError as exc:
        raise RequestError(f"chat_template_kwargs: {exc}") from exc
    return kwargs or None


def _sampling_params(body: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs}
    optional = {
        "n": _int(body, "n", 1, MAX_N),
        "temperature": _float(body, "temperature", 0.0, 2.0),
        "top_p": _float(body, "top_p", 0.0, 1.0),
        "seed": _int(body, "seed", None, None),
        "presence_penalty": _float(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _float(body, "frequency_penalty", -2.0, 2.0),
        "top_k": _int(body, "top_k", -1, None),
        "min_p": _float(body, "min_p", 0.0, 1.0),
        "min_tokens": _int(body, "min_tokens", 0, None),
        "ignore_eos": _bool(body, "ignore_eos"),
        "repetition_penalty": _float(body, "repetition_penalty", 0.0, None),
        "stop": _stop(body.get("stop")),
        "stop_token_ids": _token_ids(body, "stop_token_ids", allow_empty=True),
        "skip_special_tokens": _bool(body, "skip_special_tokens"),
        "include_stop_str_in_output": _bool(body, "include_stop_str_in_output"),
        "structured_outputs": _structured_outputs(body),
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if kwargs.get("top_p") == 0.0:
        raise RequestError("top_p: must be in (0, 1]")
    if kwargs.get("repetition_penalty") == 0.0:
        raise RequestError("repetition_penalty: must be > 0")
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED_FIELDS:
            continue
        if name in _DEFAULT_ONLY_FIELDS:
            if any(value == ok and type(value) is type(ok) for ok in _DEFAULT_ONLY_FIELDS[name]):
                continue
            raise RequestError(f"{name}: not supported (got {value!r})")
        raise RequestError(f"{name}: unrecognized request argument")


def _completion_prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt: must not be empty")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if any(t < 0 for t in value):
            raise RequestError("prompt: token ids must be >= 0")
        return list(value)
    if value is None:
        raise RequestError("prompt: required")
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise RequestError("prompt: only one prompt per request line is supported")
    raise RequestError("prompt: must be a non-empty string or a non-empty list of token ids")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages: must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise RequestError(f"{where}.role: must be one of {', '.join(_CHAT_ROLES)}, got {role!r}")
        # Small models' templates know no "developer" role; it means "system".
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(message.get("content"), where)})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{j}]: only {{'type': 'text', 'text': str}} parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{where}.content: must be a string or a list of text parts")


# One structured-output constraint a body gives: the top-level field it came from, the path
# that errors name, the StructuredOutputsParams field and its value.
_Constraint = tuple[str, str, str, Any]


def _structured_outputs(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The body's structured-output constraint, from OpenAI's `response_format` (json_object,
    json_schema) or vLLM's `structured_outputs` or older `guided_json|regex|choice|grammar`; None
    when it gives none. Two given at once are refused (which one is meant is not clear); a
    constraint that does not compile is an `invalid_constraint` error naming its field."""
    # vLLM's choice of grammar engine. treebatch has one, llguidance, which takes every
    # constraint vLLM's backends take; so any backend name is accepted and changes nothing.
    backend = body.get("guided_decoding_backend")
    if backend is not None and not isinstance(backend, str):
        raise RequestError(f"guided_decoding_backend: must be a string, got {_got(backend)}")
    given: list[_Constraint] = []
    if (found := _response_format(body.get("response_format"))) is not None:
        given.append(found)
    if (found := _structured_outputs_field(body.get("structured_outputs"))) is not None:
        given.append(found)
    for name, kind in _GUIDED_FIELDS.items():
        value = body.get(name)
        if value is not None:
            given.append((name, name, kind, _constraint_value(name, kind, value)))
    if not given:
        return None
    if len(given) > 1:
        first, *others = [field for field, _, _, _ in given]
        raise RequestError(
            f"{first}: conflicts with {', '.join(others)}; a request takes one structured-output constraint"
        )
    _, where, kind, value = given[0]
    try:
        return StructuredOutputsParams(**{kind: value})
    except (ValueError, TypeError, RecursionError) as exc:  # ConstraintError, and any the compiler raises
        message = " ".join(str(exc).split()) or type(exc).__name__
        message = message.removeprefix(f"{kind}: ")  # the field is named by its path here
        if len(message) > _MAX_CONSTRAINT_MESSAGE:
            message = message[: _MAX_CONSTRAINT_MESSAGE - 3] + "..."
        raise RequestError(f"{where}: {message}", code="invalid_constraint") from exc


def _response_format(value: Any) -> _Constraint | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f"response_format: must be an object such as {{'type': 'json_object'}}, got {_got(value)}")
    kind = value.get("type")
    if kind == "text" or kind == "json_object":
        _only_keys(value, ("type",), "response_format")
        return None if kind == "text" else ("response_format", "response_format", "json_object", True)
    if kind != "json_schema":
        raise RequestError(f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {_got(kind)}")
    _only_keys(value, ("type", "json_schema"), "response_format")
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise RequestError(f"{where}: must be an object with a 'schema' object, got {_got(spec)}")
    _only_keys(spec, ("name", "schema", "strict", "description"), where)
    for key, kind_type, wanted in (("name", str, "a string"), ("description", str, "a string"), ("strict", bool, "a boolean")):
        if spec.get(key) is not None and not isinstance(spec[key], kind_type):
            raise RequestError(f"{where}.{key}: must be {wanted}, got {_got(spec[key])}")
    # `strict: false` lets OpenAI answer outside the schema; treebatch always keeps to it.
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        got = "required" if schema is None else f"must be an object (a JSON schema), got {_got(schema)}"
        raise RequestError(f"{where}.schema: {got}")
    return ("response_format", f"{where}.schema", "json", schema)


def _structured_outputs_field(value: Any) -> _Constraint | None:
    """vLLM's `structured_outputs`: an object with exactly one of json, regex, choice, grammar,
    json_object (a key whose value is null counts as absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f"structured_outputs: must be an object such as {{'regex': '[0-9]+'}}, got {_got(value)}")
    _only_keys(value, _CONSTRAINT_KINDS, "structured_outputs")
    kinds = [kind for kind in _CONSTRAINT_KINDS if value.get(kind) is not None]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        raise RequestError(f"structured_outputs: give exactly one of {', '.join(_CONSTRAINT_KINDS)}; got {got}")
    (kind,) = kinds
    where = f"structured_outputs.{kind}"
    return ("structured_outputs", where, kind, _constraint_value(where, kind, value[kind]))


def _constraint_value(where: str, kind: str, value: Any) -> Any:
    """`value` checked to be of the JSON type constraint `kind` takes; compiling checks the rest."""
    if kind == "json":
        ok, wanted = isinstance(value, (dict, str)), "a JSON schema (an object, or its text)"
    elif kind == "choice":
        ok, wanted = isinstance(value, list) and all(isinstance(c, str) for c in value), "a list of strings"
    elif kind == "json_object":
        ok, wanted = value is True, "true"
    else:  # regex, grammar
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise RequestError(f"{where}: must be {wanted}, got {_got(value)}")
    return value


def _only_keys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in value:
        if key not in allowed:
            raise RequestError(f"{where}: unknown key {_got(key)}; allowed: {', '.join(allowed)}")


def _got(value: Any) -> str:
    """`value` for an error message: short (a request's schema or text can be megabytes)."""
    if isinstance(value, (dict, list)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)} item(s)"
    if _is_int(value) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value
    raise RequestError("stop: must be a string or a list of strings")


def _model(body: dict[str, Any]) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise RequestError("model: must be a string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict[str, Any], name: str, lo: int | None, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise RequestError(f"{name}: must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"{name}: must be {_range(lo, hi)}, got {value}")
    return value


def _float(body: dict[str, Any], name: str, lo: float | None, hi: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise RequestError(f"{name}: must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"{name}: must be {_range(lo, hi)}, got {value}")
    if not -_FLOAT_MAX <= value <= _FLOAT_MAX:  # Infinity, 1e400, or an integer beyond any float
        got = value if isinstance(value, float) else f"an integer of {len(str(abs(value)))} digits"
        raise RequestError(f"{name}: must be a finite number, got {got}")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise RequestError(f"{name}: must be a boolean, got {value!r}")


def _token_ids(body: dict[str, Any], name: str, allow_empty: bool) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
        raise RequestError(f"{name}: must be a list of non-negative integers")
    if not value and not allow_empty:
        raise RequestError(f"{name}: must not be empty")
    return list(value)


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"
