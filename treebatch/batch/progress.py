"""Progress of a batch job and its final summary.

On a terminal: a tqdm bar (requests done/total, prompt and generation tokens/s, prefix saving,
ETA). Otherwise (a log file, a CI job): one plain line every `interval` seconds, since a bar's
carriage returns make an unreadable log. Token counts add finished windows' engine summaries to
the live counters of the window now running.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

# Engine summary counters that add up across windows.
_SUMMED = (
    "prompt_tokens", "computed_prompt_tokens", "unique_prompt_tokens", "generated_tokens",
    "groups", "steps", "preemptions",
)


class JobProgress:
    def __init__(
        self, total: int, stream: IO[str] | None = None, interval: float = 5.0, use_bar: bool | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.interval = interval
        self.num_ok = 0
        self.num_failed = 0
        self.started = time.perf_counter()
        self._done_windows: dict[str, float] = {key: 0 for key in _SUMMED}
        self._peak_kv = 0.0
        self._live: dict[str, Any] = {}
        self._last_line = self.started
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self._bar = None
        if use_bar if use_bar is not None else is_tty:
            self._bar = tqdm(total=total, desc="requests", unit="req", file=self.stream, dynamic_ncols=True)

    def advance(self, ok: int = 0, failed: int = 0, engine_stats: dict[str, Any] | None = None) -> None:
        """Count finished requests; `engine_stats` is the running window's live summary."""
        self.num_ok += ok
        self.num_failed += failed
        if engine_stats is not None:
            self._live = engine_stats
        if self._bar is not None:
            self._bar.update(ok + failed)
            self._bar.set_postfix_str(self._rates(short=True), refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            done = self.num_ok + self.num_failed
            print(f"treebatch: {done}/{self.total} requests, {self._rates(short=False)}", file=self.stream, flush=True)

    def end_window(self, summary: dict[str, Any] | None) -> None:
        """Fold a finished window's engine summary into the job totals."""
        if summary:
            for key in _SUMMED:
                self._done_windows[key] += summary.get(key, 0) or 0
            self._peak_kv = max(self._peak_kv, float(summary.get("peak_kv_usage", 0.0) or 0.0))
        self._live = {}

    def totals(self) -> dict[str, float]:
        out = dict(self._done_windows)
        for key in _SUMMED:
            out[key] += self._live.get(key, 0) or 0
        return out

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The job's summary: requests ok/failed, tokens, saving, throughput, wall time, peak KV."""
        totals = self.totals()
        wall = max(time.perf_counter() - self.started, 1e-9)
        logical = totals["prompt_tokens"]
        out: dict[str, Any] = {
            "requests_ok": self.num_ok,
            "requests_failed": self.num_failed,
            **{key: int(value) for key, value in totals.items()},
            "saving_ratio": round(1.0 - totals["computed_prompt_tokens"] / logical, 4) if logical else 0.0,
            "prompt_tokens_per_s": round(logical / wall, 2),
            "generated_tokens_per_s": round(totals["generated_tokens"] / wall, 2),
            "wall_s": round(wall, 3),
            "peak_kv_usage": round(max(self._peak_kv, float(self._live.get("peak_kv_usage", 0.0) or 0.0)), 4),
        }
        out.update(extra)
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _rates(self, short: bool) -> str:
        totals = self.totals()
        wall = max(time.perf_counter() - self.started, 1e-9)
        logical = totals["prompt_tokens"]
        saving = 100.0 * (1.0 - totals["computed_prompt_tokens"] / logical) if logical else 0.0
        prompt_rate, gen_rate = logical / wall, totals["generated_tokens"] / wall
        if short:
            return f"prompt {prompt_rate:.0f} tok/s, gen {gen_rate:.0f} tok/s, saving {saving:.0f}%"
        done = self.num_ok + self.num_failed
        eta = (self.total - done) * (time.perf_counter() - self.started) / done if done else float("nan")
        return (
            f"{self.num_failed} failed, prompt {prompt_rate:.0f} tok/s, generation {gen_rate:.0f} tok/s, "
            f"prefix saving {saving:.1f}%, elapsed {wall:.0f} s, ETA {eta:.0f} s"
        )


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few human lines for stderr."""
    return (
        f"treebatch: {summary['requests_ok']} ok, {summary['requests_failed']} failed in {summary['wall_s']:.1f} s; "
        f"prompt tokens {summary['prompt_tokens']} (computed {summary['computed_prompt_tokens']}, "
        f"saving {100 * summary['saving_ratio']:.1f}%), generated {summary['generated_tokens']}; "
        f"{summary['prompt_tokens_per_s']:.0f} prompt tok/s, {summary['generated_tokens_per_s']:.0f} gen tok/s, "
        f"peak KV {100 * summary['peak_kv_usage']:.0f}%"
    )
