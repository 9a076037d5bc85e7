"""Faults are not request errors: a write that fails mid-job (a real file-size limit, in a
subprocess), SIGTERM mid-job, a second run on the same output, a model file that cannot load
(truncated, corrupt, a tensor missing or misshapen, an unknown quantization type). Each stops
cleanly with a message that says what happened; nothing is marked failed that did not fail; a
rerun answers every custom_id exactly once."""

from __future__ import annotations

import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from treebatch import cli
from treebatch.batch.lock import OutputLock
from treebatch.models.checks import ModelLoadError
from treebatch.models.default import default_model_path
from treebatch.models.gguf_loader import read_gguf
from treebatch.models.loader import load_model

TREEBATCH = [sys.executable, "-m", "treebatch"]


def _requests(path: Path, count: int) -> None:
    with open(path, "w") as f:
        for i in range(count):
            body = {"prompt": f"Item {i}:", "max_tokens": 4, "temperature": 0}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_that_fails_mid_job_loses_nothing_and_a_rerun_answers_each_request_once(tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _requests(source, 60)
    args = [*TREEBATCH, "run", str(source), "-o", str(target), "--max-num-batched-tokens", "128", "--window", "20",
            "--dtype", "float32"]
    # A real limit (RLIMIT_FSIZE, as `ulimit -f`): the write that crosses it fails with EFBIG, at a
    # random line (the whole output is some 30 kB).
    limit = random.Random().randint(1_000, 12_000)
    first = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(limit), timeout=600)
    assert first.returncode == cli.EXIT_FAULT, f"limit {limit}: {first.stderr[-2000:]}"
    assert "cannot write" in first.stderr and "File too large" in first.stderr and "resume" in first.stderr
    assert "Traceback" not in first.stderr
    assert not (tmp_path / "out.errors.jsonl").exists()  # nothing was marked failed
    written = target.read_bytes()
    assert 0 < len(written) <= limit, limit

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    records = [json.loads(line) for line in target.read_text().splitlines()]
    counts = collections.Counter(r["custom_id"] for r in records)
    assert counts == {f"q{i}": 1 for i in range(60)}
    assert all(r["error"] is None for r in records)


def test_sigterm_mid_job_loses_nothing_and_a_rerun_answers_each_request_once(tmp_path):
    # (SIGKILL, which cannot be handled: tests/test_resume.py.)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _requests(source, 40)
    args = [*TREEBATCH, "run", str(source), "-o", str(target), "--window", "8", "--fsync-interval", "0",
            "--dtype", "float32"]
    log = open(tmp_path / "stderr.txt", "w")
    process = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if target.exists() and target.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
    finally:
        process.kill()
        process.wait()
        log.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert returncode == cli.EXIT_SIGTERM and "stopped by signal" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out.errors.jsonl").exists()  # nothing was marked failed
    done_before = target.read_bytes().count(b"\n")
    assert 5 <= done_before < 40

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert collections.Counter(r["custom_id"] for r in records) == {f"q{i}": 1 for i in range(40)}
    assert all(r["error"] is None for r in records)

def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _requests(source, 2)
    with OutputLock(target):
        status = cli.main(["run", str(source), "-o", str(target)], llm_factory=lambda **o: pytest.fail("ran"))
    assert status == cli.EXIT_FAULT
    assert f"another treebatch run (pid {os.getpid()}) is writing out.jsonl" in capsys.readouterr().err
    with OutputLock(target):  # released by the first holder
        pass


@pytest.mark.parametrize("keep", [1000, 40_000_000])
def test_a_truncated_gguf_file_is_named(tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError, match=rf"cut.gguf: (not a readable GGUF file|truncated)"):
        read_gguf(cut)


@pytest.mark.parametrize(
    ("code", "message"),
    [(99, "quantization type unknown to treebatch's gguf reader"), (9, "quantization type Q8_1 cannot be read")],
    ids=["unknown-id", "unreadable-Q8_1"],
)
def test_an_unknown_quantization_type_is_named(tmp_path, code, message):
    import gguf

    from families import build, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf("mistral", build("mistral"), path)
    field = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight").field
    type_offset = field.offset + sum(part.nbytes for part in field.parts[:4])  # name, dims, shape, then type
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[type_offset : type_offset + 4], "little") == int(gguf.GGMLQuantizationType.F32)
    data[type_offset : type_offset + 4] = code.to_bytes(4, "little")
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=message):
        read_gguf(path)

@pytest.fixture
def tiny_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_truncated_safetensors_file_is_named(tiny_folder):
    weights = tiny_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: not a readable safetensors file"):
        load_model(str(tiny_folder))


def test_a_tensor_of_the_wrong_shape_is_named(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"mlp.gate_proj.weight has shape \[64, 32\], the config implies \[96, 32\]"):
        load_model(str(tiny_folder))


def test_a_missing_tokenizer_is_named_by_the_cli(tiny_folder, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    _requests(source, 1)
    status = cli.main(["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_folder)])
    assert status == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "no tokenizer" in err and "Traceback" not in err


def test_a_model_that_is_missing_a_tensor_is_named(tiny_folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_folder / "model.safetensors"))
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, str(tiny_folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="tensor model.layers.0.mlp.down_proj.weight is missing"):
        load_model(str(tiny_folder))
