"""Job progress: the bar on a terminal, plain lines elsewhere, and the totals across windows."""

import io

from treebatch.batch.progress import JobProgress, format_summary


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


STATS = {"prompt_tokens": 100, "computed_prompt_tokens": 40, "generated_tokens": 20, "peak_kv_usage": 0.25}


def test_a_terminal_gets_a_bar_with_counts_rates_and_saving():
    stream = Terminal()
    progress = JobProgress(total=5, stream=stream)
    assert progress._bar is not None
    progress.advance(ok=2, engine_stats=STATS)
    progress.advance(failed=1)
    progress._bar.refresh()
    text = stream.getvalue()
    assert "requests" in text and "3/5" in text
    assert "saving 60%" in text and "tok/s" in text
    progress.close()
    assert progress._bar is None and "\r" in stream.getvalue()  # a bar redraws in place


def test_a_log_gets_plain_lines_at_the_interval():
    stream = io.StringIO()
    progress = JobProgress(total=4, stream=stream, interval=0.0)
    assert progress._bar is None
    progress.advance(ok=1, failed=1, engine_stats=STATS)
    lines = stream.getvalue().splitlines()
    assert lines and lines[-1].startswith("treebatch: 2/4 requests, 1 failed")
    assert "prefix saving 60.0%" in lines[-1] and "\r" not in stream.getvalue()
    quiet = JobProgress(total=4, stream=io.StringIO(), interval=3600.0)
    quiet.advance(ok=1)
    assert quiet.stream.getvalue() == ""  # nothing before the interval has passed


def test_totals_add_finished_windows_to_the_live_one():
    progress = JobProgress(total=10, stream=io.StringIO(), use_bar=False, interval=3600.0)
    progress.end_window({"prompt_tokens": 300, "computed_prompt_tokens": 100, "generated_tokens": 50,
                         "groups": 2, "peak_kv_usage": 0.5})
    progress.advance(ok=6, failed=1, engine_stats=STATS)
    summary = progress.summary(output="out.jsonl")
    assert summary["requests_ok"] == 6 and summary["requests_failed"] == 1
    assert summary["prompt_tokens"] == 400 and summary["computed_prompt_tokens"] == 140
    assert summary["generated_tokens"] == 70 and summary["groups"] == 2
    assert summary["saving_ratio"] == 0.65 and summary["peak_kv_usage"] == 0.5
    assert summary["output"] == "out.jsonl"
    line = format_summary(summary)
    assert line.startswith("treebatch: 6 ok, 1 failed") and "saving 65.0%" in line and "peak KV 50%" in line
