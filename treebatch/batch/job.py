"""One `treebatch run`: read a Batch file in windows, answer each window, stream results out.

Per window: parse (errors go straight to the error file), tokenize, hand every request to the
engine at once (the prefix-tree plan is global within the window), and write each result the
moment its last sample finishes. Already answered lines (resume) are skipped before anything is
tokenized. Memory holds one window's bodies and token ids, plus the set of custom_ids (for
duplicate detection), never the whole file.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treebatch.batch.ordering import OrderedWriter
from treebatch.batch.progress import JobProgress
from treebatch.batch.prompts import PreparedRequest, PromptTokenizer, prepare_window
from treebatch.batch.reader import BatchEntry, LineError, read_batch, windows, without_errors
from treebatch.batch.resume import FinishedSet
from treebatch.batch.writer import BatchWriter, WriteFault, chat_body, completion_body, response_line

DEFAULT_WINDOW = 50_000


@dataclass(frozen=True, slots=True)
class JobOptions:
    input: Path
    output: Path
    error_file: Path
    window: int = DEFAULT_WINDOW
    ordered: bool = False
    ordered_buffer: int = 10_000  # results held in memory by --ordered before spilling to disk
    fsync_interval: float | None = 5.0


def default_error_file(output: Path) -> Path:
    """`out.jsonl` -> `out.errors.jsonl`, beside the output."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".errors.jsonl")


class BatchJob:
    """Answer the lines of `options.input` not in `finished`; returns the exit status from `run`."""

    def __init__(self, llm: Any, options: JobOptions, finished: FinishedSet, progress: JobProgress) -> None:
        self.llm = llm
        self.options = options
        self.finished = finished
        self.progress = progress
        self.tokenizer = PromptTokenizer.of(llm)
        self._warned_models: set[str] = set()
        self.num_windows = 0

    def run(self) -> int:
        """Exit status 0, or 1 if the engine failed on some request (each such request has an
        error record). A WriteFault (an output or error file cannot be written) and signals
        (KeyboardInterrupt, SystemExit) pass through after every result written is closed."""
        options = self.options
        status = 0
        out = BatchWriter(options.output, append=True, fsync_interval=options.fsync_interval)
        errors = BatchWriter(options.error_file, append=True, fsync_interval=options.fsync_interval)
        try:
            options.output.touch()  # an empty output says "this run started": a rerun resumes it
        except OSError as exc:
            raise WriteFault(options.output, exc) from exc
        ordered = OrderedWriter(out, options.ordered_buffer) if options.ordered else None
        try:
            for window in windows(read_batch(options.input), options.window):
                if self._answer_window(window, out, errors, ordered) != 0:
                    status = 1
        finally:
            closers = ([ordered.close] if ordered is not None else []) + [out.close, errors.close]
            _close_all(closers)
        return status

    def _answer_window(
        self, window: list[BatchEntry | LineError], out: BatchWriter, errors: BatchWriter,
        ordered: OrderedWriter | None,
    ) -> int:
        def write_error(error: LineError) -> None:
            self._write_error(errors, error.custom_id, error.code, error.message)

        todo = without_errors((e for e in window if not self.finished.covers(e)), write_error)
        if not todo:
            return 0
        ready = without_errors(prepare_window(todo, self.tokenizer), write_error)
        if not ready:
            return 0
        self.num_windows += 1
        self._warn_model_names([r.entry.request.model for r in ready])
        # In ordered mode a window's results are numbered after everything written before it.
        base = ordered.next_seq if ordered is not None else 0
        answered = [False] * len(ready)
        failure = self._generate(ready, range(len(ready)), answered, base, out, ordered)
        status = 0
        if failure is not None:
            traceback.print_exception(failure)
            # One request's fault must not fail the window: the unanswered run again, each alone,
            # and only one that fails by itself gets an error record (final: it failed twice).
            print(f"treebatch: engine error ({type(failure).__name__}: {failure}); retrying the "
                  f"{answered.count(False)} unanswered requests of this window one at a time", file=sys.stderr)
            for index in [i for i, done in enumerate(answered) if not done]:
                exc = self._generate(ready, [index], answered, base, out, ordered)
                if exc is not None:
                    entry = ready[index].entry
                    message = f"line {entry.line}: {type(exc).__name__}: {exc}"
                    self._write_error(errors, entry.custom_id, "engine_error", message, retryable=True)
                    if ordered is not None:
                        ordered.skip(base + index)
                    status = 1
            self.progress.end_window(self._live_stats())  # last_run_summary is a previous window's
            return status
        self.progress.end_window(getattr(self.llm, "last_run_summary", None))
        return 0

    def _generate(
        self, ready: list[PreparedRequest], indices: Sequence[int], answered: list[bool], base: int,
        out: BatchWriter, ordered: OrderedWriter | None,
    ) -> Exception | None:
        """Run `ready[i]` for i in `indices` as one batch and write each result as it finishes;
        returns the engine's exception, if it raised one (results written before it stay).
        A failed write is a fault of the job, not of a request: it passes through."""
        try:
            results = self.llm.generate_iter(
                [ready[i].engine_prompt for i in indices], [ready[i].params for i in indices], use_tqdm=False
            )
            for position, output in results:
                index = indices[position]
                request = ready[index].entry.request
                make_body = chat_body if request.is_chat else completion_body
                body = make_body(output, self.llm.model_name, request.logprobs, self._token_text)
                line = response_line(ready[index].entry.custom_id, body)
                if ordered is not None:
                    ordered.put(base + index, line)
                else:
                    out.write_line(line, is_error=False)
                answered[index] = True
                self.progress.advance(ok=1, engine_stats=self._live_stats())
        except WriteFault:
            raise
        except Exception as exc:
            return exc
        return None

    def _write_error(
        self, errors: BatchWriter, custom_id: str | None, code: str, message: str, retryable: bool = False
    ) -> None:
        errors.write_error(custom_id, code, message, retryable)
        self.progress.advance(failed=1)

    def _token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])

    def _live_stats(self) -> dict[str, Any] | None:
        engine = getattr(self.llm, "engine", None)
        return engine.stats.summary() if engine is not None else None

    def _warn_model_names(self, requested: list[str | None]) -> None:
        # Batch files are often written for another provider; answering beats failing them all.
        served = self.llm.model_name
        others = sorted({name for name in requested if name and name != served} - self._warned_models)
        if others:
            self._warned_models.update(others)
            print(
                f"treebatch: warning: requests name model(s) {', '.join(map(repr, others))}; serving {served!r}",
                file=sys.stderr,
            )


def _close_all(closers: list[Any]) -> None:
    """Call every closer; then raise the first failure, if any (one failed close must not leave
    the other files open and unflushed)."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except Exception as exc:  # noqa: PERF203
            first = first or exc
    if first is not None:
        raise first
