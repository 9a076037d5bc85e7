"""`treebatch plan`: validation and prefix-tree analysis of a Batch file, without model weights."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from treebatch import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "batch.jsonl"
SYSTEM = "You are a terse assistant who answers questions about documents. "  # 67 tokens, one per char


class CharTokenizer:
    """One token per character; fast enough for a 200k-line file."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def apply_chat_template(self, conversations: list, tokenize: bool = False, add_generation_prompt: bool = True):
        if conversations and isinstance(conversations[0], list):
            return [self.apply_chat_template(c) for c in conversations]
        return "".join(m["content"] for m in conversations) + "|"

    def __len__(self) -> int:
        return 0x110000


def fake_tokenizer(model: str | None, tokenizer: str | None, max_model_len: int | None) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=CharTokenizer(), max_model_len=max_model_len or 4096, model_name="char-model")


def request(custom_id: str, prompt: str, **body: object) -> str:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, **body}}
    )


def plan_json(path: Path, *extra: str, capsys) -> dict:
    assert cli.main(["plan", str(path), "--json", *extra], tokenizer_factory=fake_tokenizer) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_counts_shared_prefixes_and_reports_bad_lines(tmp_path, capsys):
    lines = [request(f"q{i}", SYSTEM + f"Doc {i % 2}. Question {i}?", max_tokens=4) for i in range(6)]
    lines += [request("n", "Unrelated prompt", n=3, max_tokens=2), "junk", request("q0", "dup")]
    lines.append(request("long", "x" * 5000))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    a = plan_json(path, capsys=capsys)
    assert (a["lines"], a["valid"], a["invalid"]) == (10, 7, 3)
    assert a["errors_by_code"] == {"context_length_exceeded": 1, "duplicate_custom_id": 1, "invalid_json": 1}
    assert any(message.startswith("line 8: ") for message in a["errors"])
    assert (a["requests"], a["sequences"], a["model"]) == (7, 9, "char-model")
    logical = sum(len(SYSTEM + f"Doc {i % 2}. Question {i}?") for i in range(6)) + 3 * len("Unrelated prompt")
    assert a["prompt_tokens"] == logical and a["max_new_tokens"] == 6 * 4 + 3 * 2
    assert a["unique_prompt_tokens"] < a["planned_prompt_tokens"] < logical
    assert a["groups"] >= 2 and a["grouped_sequences"] == 9 and a["saving_ratio"] > 0.5
    assert sum(a["share_histogram"].values()) == a["groups"]
    assert len(a["windows"]) == 1 and a["windows"][0]["requests"] == 7

    # Windows split the tree: sharing across windows is lost, counts still add up.
    b = plan_json(path, "--window", "2", capsys=capsys)
    assert len(b["windows"]) == 4 and b["requests"] == 7 and b["prompt_tokens"] == logical
    assert b["planned_prompt_tokens"] > a["planned_prompt_tokens"]
    off = plan_json(path, "--no-enable-prefix-sharing", capsys=capsys)
    assert off["planned_prompt_tokens"] == logical and off["groups"] == 0

    assert cli.main(["plan", str(path)], tokenizer_factory=fake_tokenizer) == 0
    text = capsys.readouterr().out
    assert "7 valid, 3 invalid" in text and "saving" in text and "line 8: " in text


def test_plan_checks_every_structured_output_constraint(tmp_path, capsys):
    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
    lines = [
        request("schema", "x", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}),
        request("choice", "x", guided_choice=["yes", "no"]),
        request("bad-regex", "x", guided_regex="[unclosed"),
        request("bad-grammar", "x", structured_outputs={"grammar": "start: nowhere"}),
        request("unsupported", "x", guided_json={"type": "array", "uniqueItems": True}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    a = plan_json(path, capsys=capsys)
    assert (a["valid"], a["invalid"]) == (2, 3) and a["errors_by_code"] == {"invalid_constraint": 3}
    assert any(m.startswith("line 3: body.guided_regex:") for m in a["errors"])
    assert any("uniqueItems" in m for m in a["errors"])

def test_plan_loads_the_tokenizer_but_no_weights(tmp_path, capsys, monkeypatch):
    import treebatch.models.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("plan must not load model weights")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(loader, "_read_cache", refuse)
    assert cli.main(["plan", str(EXAMPLE), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["invalid"] == 0 and a["requests"] == 12 and a["model"].startswith("SmolLM2")
    assert a["prompt_tokens"] > a["planned_prompt_tokens"]  # the example shares a system prompt


def test_plan_rejects_a_missing_file(tmp_path):
    assert cli.main(["plan", str(tmp_path / "none.jsonl")], tokenizer_factory=fake_tokenizer) == 2


@pytest.mark.slow
def test_plan_of_200k_lines_in_windows(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(request(f"r{i}", f"{SYSTEM}Doc {i % 100}: facts. Q{i}?", max_tokens=8) + "\n")
    started = time.perf_counter()
    a = plan_json(path, "--window", "50000", capsys=capsys)
    seconds = time.perf_counter() - started
    assert a["valid"] == 200_000 and len(a["windows"]) == 4
    assert all(w["groups"] >= 100 for w in a["windows"])  # the system prompt, then one group per document
    assert a["saving_ratio"] > 0.8
    assert seconds < 120, f"plan of 200k lines took {seconds:.0f} s"


def test_plan_predicts_run_time_from_the_calibration(tmp_path, capsys):
    """--predict: the cost model with the engine's calibration; sharing predicts less time."""
    from treebatch.core.calibration_table import CalibrationTable

    from treebatch.config import EngineConfig, RunnerConfig, SchedulerConfig
    from treebatch.engine import LLMEngine

    table = CalibrationTable({16: 0.05, 64: 0.12, 256: 0.4}, seconds_per_context_pair=1e-6, token_budget=64)
    engine = SimpleNamespace(  # what LLMEngine.predict reads of a loaded engine
        calibration=table, scheduler_config=SchedulerConfig(max_num_batched_tokens=64),
        runner_config=RunnerConfig(shared_prefix_attention_min_decodes=8), config=EngineConfig(),
        num_blocks=4096, max_model_len=2048,
    )
    engine.predict = lambda prompts, max_tokens: LLMEngine.predict(engine, prompts, max_tokens)
    lines = [request(f"q{i}", SYSTEM * 3 + f"Question {i}?", max_tokens=8) for i in range(8)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    made = []

    def fake_llm(**options):
        made.append(options)
        return SimpleNamespace(engine=engine)

    assert cli.main(["plan", str(path), "--json", "--predict"], llm_factory=fake_llm, tokenizer_factory=fake_tokenizer) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert len(made) == 1
    assert 0 < analysis["predicted_seconds"] < analysis["predicted_seconds_no_sharing"]
    assert analysis["predicted_speedup"] > 1 and analysis["token_budget"] == 64
    assert analysis["windows"][0]["prediction"]["decode_tokens"] == 8 * 8
    assert cli.main(["plan", str(path), "--predict"], llm_factory=fake_llm, tokenizer_factory=fake_tokenizer) == 0
    assert "predicted" in capsys.readouterr().out
    # Without --predict no engine is built.
    plan_json(path, capsys=capsys)
    assert len(made) == 2
