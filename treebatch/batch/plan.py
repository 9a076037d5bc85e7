"""`treebatch plan`: validate a Batch file and analyse its prefix tree, without the model weights.

`analyze_batch` returns a plain dict (JSON-ready) so that more analyses, such as a run-time
prediction, can be added as further keys; `format_plan` prints it for people. The file is read
and planned window by window, exactly as `treebatch run` would cut it, and only one window's token
ids live at a time. Each request counts once per sample (n), since the engine plans one sequence
per sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from treebatch.batch.prompts import PreparedRequest, PromptTokenizer, prepare_window
from treebatch.batch.reader import LineError, read_batch, windows, without_errors
from treebatch.config import EngineConfig
from treebatch.core.plan import plan_batch

MAX_LISTED_ERRORS = 20
# (prompts, output tokens per prompt) -> the cost model's prediction for one window
Predictor = Callable[[list[np.ndarray], list[int]], dict[str, Any]]
# Window totals that add up to the file's.
_SUMMED = (
    "requests", "sequences", "prompt_tokens", "unique_prompt_tokens", "planned_prompt_tokens",
    "groups", "grouped_sequences", "max_new_tokens",
)


def analyze_batch(
    path: str | Path,
    tokenizer: PromptTokenizer,
    window: int,
    config: EngineConfig | None = None,
    model_name: str | None = None,
    predict: Predictor | None = None,
) -> dict[str, Any]:
    """Validation counts, errors, and the plan of every window (`core.plan.plan_batch` with the
    engine's scheduler and cache settings; None: the defaults), with file totals.

    `predict`: the cost model; each window then carries its predicted seconds with and without
    sharing (every request generating its max_tokens), and the file its total."""
    config = config or EngineConfig()
    num_lines = 0
    errors_by_code: Counter[str] = Counter()
    listed_errors: list[str] = []
    per_window: list[dict[str, Any]] = []

    def count_error(error: LineError) -> None:
        errors_by_code[error.code] += 1
        if len(listed_errors) < MAX_LISTED_ERRORS:
            listed_errors.append(error.message)

    for part in windows(read_batch(path), window):
        num_lines += len(part)
        ready = without_errors(prepare_window(without_errors(part, count_error), tokenizer), count_error)
        if ready:
            per_window.append(analyze_window(ready, config, predict))

    totals: dict[str, Any] = {key: sum(w[key] for w in per_window) for key in _SUMMED}
    histogram: Counter[int] = Counter()
    for w in per_window:
        histogram.update(w["share_histogram"])
    logical = totals["prompt_tokens"]
    num_failed = sum(errors_by_code.values())
    return {
        "input": str(path),
        "model": model_name,
        "max_model_len": tokenizer.max_model_len,
        "window": window,
        "min_shared_prefix_tokens": (
            config.scheduler.min_shared_prefix_tokens if config.scheduler.enable_prefix_sharing else None
        ),
        "lines": num_lines,
        "valid": num_lines - num_failed,
        "invalid": num_failed,
        "errors_by_code": dict(sorted(errors_by_code.items())),
        "errors": listed_errors,
        **totals,
        "saving_ratio": _saving(totals["planned_prompt_tokens"], logical),
        "optimal_saving_ratio": _saving(totals["unique_prompt_tokens"], logical),
        "share_histogram": dict(sorted(histogram.items())),
        "max_prompt_tokens": max((w["max_prompt_tokens"] for w in per_window), default=0),
        **_predicted_totals(per_window),
        "windows": per_window,
    }


def _predicted_totals(per_window: list[dict[str, Any]]) -> dict[str, Any]:
    predictions = [w["prediction"] for w in per_window if "prediction" in w]
    if not predictions:
        return {}
    with_sharing = sum(p["predicted_seconds"] for p in predictions)
    without = sum(p["predicted_seconds_no_sharing"] for p in predictions)
    return {
        "predicted_seconds": round(with_sharing, 2),
        "predicted_seconds_no_sharing": round(without, 2),
        "predicted_speedup": round(without / max(with_sharing, 1e-9), 3),
        "token_budget": predictions[0].get("token_budget"),
    }


def analyze_window(ready: list[PreparedRequest], config: EngineConfig, predict: Predictor | None = None) -> dict[str, Any]:
    """The plan of one window, as the engine would make it: its summary, as numbers."""
    prompts: list[np.ndarray] = []
    outputs: list[int] = []
    for prepared in ready:
        ids = np.frombuffer(prepared.token_ids, dtype=np.int32)  # a view: no copy per sample
        n = prepared.params.n
        prompts.extend([ids] * n)
        outputs.extend([max(1, prepared.params.max_tokens or 0)] * n)
    summary = plan_batch(prompts, outputs, config.scheduler, config.cache.block_size).summary
    analysis: dict[str, Any] = {
        "requests": len(ready),
        "sequences": summary.num_sequences,
        "prompt_tokens": summary.num_prompt_tokens,
        "unique_prompt_tokens": summary.num_unique_tokens,
        "planned_prompt_tokens": summary.num_planned_tokens,
        "groups": summary.num_groups,
        "grouped_sequences": summary.num_grouped_sequences,
        "max_depth": summary.max_depth,
        "share_histogram": dict(summary.share_histogram),
        "max_new_tokens": sum(prepared.params.n * (prepared.params.max_tokens or 0) for prepared in ready),
        "max_prompt_tokens": max((len(p) for p in prompts), default=0),
    }
    if predict is not None and prompts:
        analysis["prediction"] = predict(prompts, outputs)
    return analysis


def format_plan(analysis: dict[str, Any]) -> str:
    """The analysis as text for a terminal."""
    a = analysis
    lines = [
        f"input       {a['input']}  (model {a['model']}, context {a['max_model_len']} tokens)",
        f"lines       {a['lines']}: {a['valid']} valid, {a['invalid']} invalid",
    ]
    if a["errors_by_code"]:
        lines.append("errors      " + ", ".join(f"{code} {count}" for code, count in a["errors_by_code"].items()))
        lines.extend(f"            {message}" for message in a["errors"])
        if a["invalid"] > len(a["errors"]):
            lines.append(f"            ... and {a['invalid'] - len(a['errors'])} more")
    lines += [
        f"windows     {len(a['windows'])} of up to {a['window']} requests",
        f"requests    {a['requests']} ({a['sequences']} sequences counting n)",
        f"prompt      {a['prompt_tokens']} tokens logical, {a['unique_prompt_tokens']} unique "
        f"(optimal saving {100 * a['optimal_saving_ratio']:.1f}%)",
        f"planned     {a['planned_prompt_tokens']} tokens computed (saving {100 * a['saving_ratio']:.1f}%)",
        f"groups      {a['groups']} holding {a['grouped_sequences']} sequences, "
        + ("prefix sharing off" if a["min_shared_prefix_tokens"] is None
           else f"min shared prefix {a['min_shared_prefix_tokens']} tokens"),
        "share       " + (", ".join(f"{k}x: {v}" for k, v in a["share_histogram"].items()) or "none"),
        f"generation  up to {a['max_new_tokens']} tokens; longest prompt {a['max_prompt_tokens']} tokens",
    ]
    if "predicted_seconds" in a:
        lines.append(
            f"predicted   {a['predicted_seconds']:.1f} s with prefix sharing, {a['predicted_seconds_no_sharing']:.1f} s "
            f"without ({a['predicted_speedup']:.2f}x), every request to max_tokens, "
            f"{a['token_budget']} tokens per step"
        )
    return "\n".join(lines)


def _saving(computed: int, logical: int) -> float:
    return round(1.0 - computed / logical, 4) if logical else 0.0
