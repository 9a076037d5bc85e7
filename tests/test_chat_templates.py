"""Chat templates: `chat_template_kwargs` (Qwen3's enable_thinking) in batch files and in LLM.chat,
rendered as transformers renders them with one BOS; a model without a template refuses chats.

No model weights are loaded: the tokenizers are the default model's, saved to a folder with a
template written here (and a post-processor that adds BOS, so a doubled BOS would show)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from treebatch.batch.plan import analyze_batch
from treebatch.batch.prompts import PreparedRequest, PromptTokenizer, prepare_window
from treebatch.batch.reader import LineError, parse_lines
from treebatch.llm import LLM
from treebatch.tokenizer import (
    NoChatTemplateError,
    check_chat_template_kwargs,
    chat_token_ids,
    load_tokenizer,
    load_tokenizer_only,
)

# A Qwen3-style template: `enable_thinking=False` writes an empty think block after the header.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% if style is defined %}[{{ style.tone }}:{{ style.words | join(',') }}]{% endif %}{% endif %}"
)
BOS = "<|endoftext|>"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tokenizer folders from the default model's tokenizer: one with THINKING_TEMPLATE and a
    post-processor that prepends BOS on every encode, one with no chat template at all."""
    from tokenizers.processors import TemplateProcessing

    base = load_tokenizer_only().tokenizer
    thinking = tmp_path_factory.mktemp("thinking")
    base.bos_token = BOS
    bos_id = base.convert_tokens_to_ids(BOS)
    base.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    base.chat_template = THINKING_TEMPLATE
    base.save_pretrained(str(thinking))
    plain = tmp_path_factory.mktemp("no_template")
    base.chat_template = None
    base.save_pretrained(str(plain))
    assert not (plain / "chat_template.jinja").exists()
    return SimpleNamespace(thinking=str(thinking), plain=str(plain), bos_id=bos_id)


@pytest.fixture(scope="module")
def tok(folders):
    tokenizer = load_tokenizer(folders.thinking)
    assert tokenizer("hi").input_ids[0] == folders.bos_id  # encoding adds BOS: a doubled one would show
    return tokenizer


def _expected(tokenizer, messages, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids


def _stub_llm(tokenizer, name: str = "stub-model") -> LLM:
    """An LLM facade over a tokenizer alone: `chat` renders, and `generate` hands back its prompts."""
    llm = LLM.__new__(LLM)
    llm.engine = SimpleNamespace(tokenizer=tokenizer, model_name=name, max_model_len=4096)
    llm.generate = lambda prompts, params=None, use_tqdm=True: prompts  # type: ignore[method-assign]
    return llm


def test_enable_thinking_renders_as_transformers_with_one_bos(tok, folders):
    off = chat_token_ids(tok, MESSAGES, True, {"enable_thinking": False})
    on = chat_token_ids(tok, MESSAGES, True, {"enable_thinking": True})
    plain = chat_token_ids(tok, MESSAGES)
    assert off == _expected(tok, MESSAGES, enable_thinking=False)
    assert on == _expected(tok, MESSAGES, enable_thinking=True) == plain  # the template's default: thinking
    assert off != on and "<think>" in tok.decode(off) and "<think>" not in tok.decode(on)
    # transformers' own tokenize=True path agrees (it too encodes without special tokens)
    assert off == tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False
    )
    for ids in (off, on):
        assert ids[0] == folders.bos_id and ids[1] != folders.bos_id and ids.count(folders.bos_id) == 1
    nested = {"style": {"tone": "dry", "words": ["a", "b"]}}
    assert tok.decode(chat_token_ids(tok, MESSAGES, True, nested)).endswith("[dry:a,b]")


def test_llm_chat_passes_kwargs_and_checks_them(tok):
    llm = _stub_llm(tok)
    prompts = llm.chat(MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert prompts == [{"prompt_token_ids": _expected(tok, MESSAGES, enable_thinking=False)}]
    many = llm.chat([MESSAGES, MESSAGES[1:]], chat_template_kwargs={"enable_thinking": False})
    assert [p["prompt_token_ids"] for p in many] == [
        _expected(tok, MESSAGES, enable_thinking=False), _expected(tok, MESSAGES[1:], enable_thinking=False)
    ]
    assert llm.apply_chat_template(MESSAGES, chat_template_kwargs={"enable_thinking": True}) == _expected(tok, MESSAGES)
    for bad, says in [
        (["enable_thinking"], "must be an object"),
        ({"tokenize": True}, "tokenize: set by treebatch"),
        ({"add_generation_prompt": False}, "add_generation_prompt: set by treebatch"),
        ({"x": object()}, "x: must be a JSON value"),
        ({"x": float("nan")}, "x: must be a JSON value"),
    ]:
        with pytest.raises(ValueError, match=says):
            llm.chat(MESSAGES, chat_template_kwargs=bad)
    assert check_chat_template_kwargs(None) == {}


def test_base_model_chat_is_refused_not_guessed(folders):
    tokenizer = load_tokenizer(folders.plain)
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match="chat template"):  # what transformers itself does today
        tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    llm = _stub_llm(tokenizer, "my-base-model")
    with pytest.raises(NoChatTemplateError, match="model my-base-model has no chat template") as info:
        llm.chat(MESSAGES)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="no chat template"):
        llm.apply_chat_template(MESSAGES)
    assert llm.generate(["plain text works"]) == ["plain text works"]


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(content: str = "Name three rivers.", **extra) -> dict:
    return {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}], **extra}


def test_batch_lines_with_chat_template_kwargs(tok):
    lines = [
        _line("off", _chat(chat_template_kwargs={"enable_thinking": False})),
        _line("on", _chat(chat_template_kwargs={"enable_thinking": True})),
        _line("none", _chat()),
        _line("empty", _chat(chat_template_kwargs={})),
        _line("off2", _chat("Name two seas.", chat_template_kwargs={"enable_thinking": False})),
        _line("null", _chat(chat_template_kwargs=None)),
        _line("bad-type", _chat(chat_template_kwargs=["enable_thinking"])),
        _line("bad-str", _chat(chat_template_kwargs="enable_thinking=false")),
        _line("reserved", _chat(chat_template_kwargs={"add_generation_prompt": False})),
        _line("completion", {"prompt": "Rivers:", "chat_template_kwargs": {"enable_thinking": False}}, "/v1/completions"),
        _line("nested", _chat(chat_template_kwargs={"enable_thinking": False, "style": {"tone": "dry", "words": ["x"]}})),
    ]
    parsed = list(parse_lines(lines))
    errors = {p.custom_id: p for p in parsed if isinstance(p, LineError)}
    assert sorted(errors) == ["bad-str", "bad-type", "completion", "reserved"]
    assert errors["bad-type"].message == "line 7: body.chat_template_kwargs: must be an object (a dict of template variables), got list"
    assert errors["bad-str"].message.startswith("line 8: body.chat_template_kwargs: must be an object")
    assert errors["reserved"].message.startswith("line 9: body.chat_template_kwargs: add_generation_prompt:")
    assert errors["completion"].message == "line 10: body.chat_template_kwargs: unrecognized request argument"

    entries = [p for p in parsed if not isinstance(p, LineError)]
    results = prepare_window(entries, PromptTokenizer(tok, 4096, "stub-model"))
    assert all(isinstance(r, PreparedRequest) for r in results)
    ids = {r.entry.custom_id: r.token_ids.tolist() for r in results}
    system_and = lambda content: [MESSAGES[0], {"role": "user", "content": content}]  # noqa: E731
    assert ids["off"] == _expected(tok, MESSAGES, enable_thinking=False)
    assert ids["on"] == ids["none"] == ids["empty"] == ids["null"] == _expected(tok, MESSAGES)
    assert ids["off2"] == _expected(tok, system_and("Name two seas."), enable_thinking=False)
    assert ids["nested"] == _expected(tok, MESSAGES, enable_thinking=False, style={"tone": "dry", "words": ["x"]})
    assert len({tuple(v) for v in ids.values()}) == 4  # off, on, off2, nested: different prompts


def test_render_batches_one_call_per_distinct_kwargs(tok):
    """Conversations render in one template call per distinct kwargs, and each result goes back
    to its own line even when lines of different kwargs interleave."""
    calls: list[tuple[int, dict]] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner
            self.chat_template = inner.chat_template

        def apply_chat_template(self, conversations, **kwargs):
            calls.append((len(conversations), {k: v for k, v in kwargs.items() if k not in ("tokenize", "add_generation_prompt")}))
            return self.inner.apply_chat_template(conversations, **kwargs)

    kinds = [{"enable_thinking": False}, None, {"enable_thinking": True}, {"enable_thinking": False}, None]
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(len(kinds))]
    texts = PromptTokenizer(Counting(tok), 4096).render_chats(conversations, kinds)
    for text, messages, kwargs in zip(texts, conversations, kinds):
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(kwargs or {}))
    assert sorted(calls, key=repr) == sorted([(2, {"enable_thinking": False}), (2, {}), (1, {"enable_thinking": True})], key=repr)


def test_batch_chat_to_a_model_without_template_is_an_error_record(folders):
    tokenizer = load_tokenizer(folders.plain)
    lines = [
        _line("chat", _chat()),
        _line("text", {"prompt": "Three rivers:"}, "/v1/completions"),
        _line("chat2", _chat("Name two seas.", chat_template_kwargs={"enable_thinking": False})),
    ]
    results = prepare_window(list(parse_lines(lines)), PromptTokenizer(tokenizer, 4096, "my-base-model"))
    assert isinstance(results[0], LineError) and isinstance(results[2], LineError)
    assert results[0].message == "line 1: model my-base-model has no chat template; use /v1/completions"
    assert results[2].message == "line 3: model my-base-model has no chat template; use /v1/completions"
    assert results[0].code == results[2].code == "no_chat_template" and results[0].custom_id == "chat"
    assert isinstance(results[1], PreparedRequest)
    assert results[1].token_ids.tolist() == tokenizer("Three rivers:").input_ids


def test_plan_groups_thinking_and_non_thinking_lines(tmp_path, folders):
    """Plan through the tokenizer-only load of the folder: lines that differ only in the kwargs
    share the system prompt and header, and diverge where the template's output does."""
    long_system = "You answer questions about rivers. " * 8
    body = lambda q, thinking: {  # noqa: E731
        "messages": [{"role": "system", "content": long_system}, {"role": "user", "content": q}],
        "chat_template_kwargs": {"enable_thinking": thinking},
        "max_tokens": 4,
    }
    lines = [_line(f"l{i}", body(q, t)) for i, (q, t) in enumerate(
        [(q, t) for q in ("Longest river?", "Widest river?") for t in (False, True)]
    )]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_tokenizer_only(folders.thinking)
    analysis = analyze_batch(path, PromptTokenizer.of(loaded), window=100)
    assert analysis["valid"] == 4 and analysis["invalid"] == 0
    tok = loaded.tokenizer
    prompts = [
        _expected(tok, [{"role": "system", "content": long_system}, {"role": "user", "content": q}], enable_thinking=t)
        for q in ("Longest river?", "Widest river?") for t in (False, True)
    ]
    assert analysis["prompt_tokens"] == sum(map(len, prompts))
    assert len({tuple(p) for p in prompts}) == 4
    assert analysis["planned_prompt_tokens"] < analysis["prompt_tokens"]  # the system prompt is shared
