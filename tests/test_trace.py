"""The per-step trace: one JSON line per step, and no step runs decode-only while prefill work
waits and the KV cache has room (stall-free token batching)."""

from __future__ import annotations

import json

from conftest import PROMPTS
from treebatch import LLM, SamplingParams


def test_trace_records_steps_and_no_decode_only_step_while_prefill_waits(tmp_path):
    trace = tmp_path / "trace.jsonl"
    budget = 32
    llm = LLM(kv_cache_memory=256 << 20, max_num_batched_tokens=budget, trace_file=str(trace), check_integrity=True)
    system = "You are a helpful assistant. Answer in one short sentence, please. "
    prompts = [system + p for p in PROMPTS[:5]] + PROMPTS[5:9]
    llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=2 + 2 * (i % 3), ignore_eos=True)
                           for i in range(len(prompts))], use_tqdm=False)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == llm.last_run_summary["steps"]
    assert sum(r["num_decode_tokens"] for r in records) + len(prompts) == llm.last_run_summary["generated_tokens"]
    total_blocks = records[0]["kv_total_blocks"]
    for record in records:
        assert record["num_tokens"] == record["num_decode_tokens"] + record["num_prefill_tokens"] <= budget
        assert record["step_time_s"] > 0 and 0 < record["kv_used_blocks"] <= total_blocks
        if record["num_prefill_tokens"] == 0 and record["num_tokens"] < budget:
            # decode-only with budget to spare: only when nothing waits (the KV here is ample)
            assert record["num_waiting"] == 0, record
    assert any(r["num_decode_tokens"] and r["num_prefill_tokens"] for r in records)  # mixed steps happen
