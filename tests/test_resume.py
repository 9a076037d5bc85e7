"""A real `treebatch run` killed at a random moment, then resumed: every custom_id exactly once,
and the resumed outputs equal an uninterrupted run's (greedy). Output lines are checked against
the OpenAI Batch output schema."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from treebatch import cli

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TOPICS = ["rivers", "mountains", "planets", "colors", "birds", "trees"]


def batch_lines() -> list[str]:
    lines = []
    for i, topic in enumerate(TOPICS * 2):
        if i % 2:
            url, body = "/v1/chat/completions", {
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Name {i % 3 + 2} {topic}."}],
                "max_completion_tokens": 4, "temperature": 0,
            }
        else:
            url, body = "/v1/completions", {"prompt": f"{SYSTEM}\nQ: Name two {topic}.\nA:", "max_tokens": 4, "temperature": 0}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    return lines


# The published shape of an OpenAI Batch output line and of the bodies it carries.
_LINE = {"id": str, "custom_id": str, "response": (dict, type(None)), "error": (dict, type(None))}
_RESPONSE = {"status_code": int, "request_id": str, "body": dict}
_BODY = {"id": str, "object": str, "created": int, "model": str, "choices": list, "usage": dict}
_USAGE = {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int, "prompt_tokens_details": dict}
_COMPLETION_CHOICE = {"index": int, "text": str, "logprobs": (dict, type(None)), "finish_reason": str}
_CHAT_CHOICE = {"index": int, "message": dict, "logprobs": (dict, type(None)), "finish_reason": str}


def _fields(value: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    assert set(value) == set(schema), f"{where}: fields {sorted(value)} != {sorted(schema)}"
    for name, kind in schema.items():
        assert isinstance(value[name], kind), f"{where}.{name}: {type(value[name]).__name__}"


def check_output_line(line: dict[str, Any]) -> None:
    _fields(line, _LINE, "line")
    assert (line["response"] is None) != (line["error"] is None)
    if line["error"] is not None:
        _fields(line["error"], {"code": str, "message": str}, "error")
        return
    _fields(line["response"], _RESPONSE, "response")
    body = line["response"]["body"]
    _fields(body, _BODY, "body")
    _fields(body["usage"], _USAGE, "usage")
    _fields(body["usage"]["prompt_tokens_details"], {"cached_tokens": int}, "usage.prompt_tokens_details")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chat = body["object"] == "chat.completion"
    assert body["object"] in ("chat.completion", "text_completion")
    for choice in body["choices"]:
        _fields(choice, _CHAT_CHOICE if chat else _COMPLETION_CHOICE, "choice")
        assert choice["finish_reason"] in ("stop", "length")
        if chat:
            _fields(choice["message"], {"role": str, "content": str}, "message")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines()] if path.exists() else []


def answers(path: Path) -> dict[str, list[str]]:
    out = {}
    for record in records(path):
        choices = record["response"]["body"]["choices"]
        out[record["custom_id"]] = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, llm, capsys):
    lines = batch_lines()
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    log = open(tmp_path / "stderr.txt", "w")
    command = [sys.executable, "-m", "treebatch", "run", str(source), "-o", str(target), "--window", "6",
               "--fsync-interval", "0", "--kv-cache-memory", "256M", "--dtype", "float32"]  # as the `llm` fixture
    process = subprocess.Popen(command, cwd=REPO, stderr=log, stdout=log)
    wanted = random.Random().randint(1, len(lines) // 2)  # a random moment, after some results
    deadline = time.monotonic() + 240
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if target.exists() and target.read_bytes().count(b"\n") >= wanted:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before the kill: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        log.close()
    done_before = len(records(target))
    assert 1 <= done_before < len(lines)

    capsys.readouterr()
    assert cli.main(["run", str(source), "-o", str(target)], llm_factory=lambda **config: llm) == 0
    assert "resuming" in capsys.readouterr().err
    resumed = records(target)
    assert sorted(r["custom_id"] for r in resumed) == sorted(f"req-{i}" for i in range(len(lines)))
    assert not (tmp_path / "out.errors.jsonl").exists()

    fresh = tmp_path / "fresh.jsonl"
    assert cli.main(["run", str(source), "-o", str(fresh), "--window", "6", "--ordered"],
                    llm_factory=lambda **config: llm) == 0
    assert [r["custom_id"] for r in records(fresh)] == [f"req-{i}" for i in range(len(lines))]
    assert answers(target) == answers(fresh)
    for record in resumed + records(fresh):
        check_output_line(record)
        assert record["response"]["status_code"] == 200 and record["error"] is None
