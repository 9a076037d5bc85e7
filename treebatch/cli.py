"""`treebatch run | plan`: answer or analyse an OpenAI Batch API file offline.

Engine flags are generated from the config dataclasses, so a new config field is a
new flag without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from treebatch.batch.job import DEFAULT_WINDOW, BatchJob, JobOptions, default_error_file
from treebatch.batch.progress import JobProgress, format_summary
from treebatch.batch.reader import count_lines
from treebatch.batch.lock import OutputLock, OutputLocked
from treebatch.batch.resume import FinishedSet, ResumeError, drop_retryable, scan_finished
from treebatch.batch.writer import WriteFault
from treebatch.models.checks import ModelLoadError
from treebatch.models.named import ModelCacheError
from treebatch.config import CacheConfig, EngineConfig, RunnerConfig, SchedulerConfig

LLMFactory = Callable[..., Any]
TokenizerFactory = Callable[..., Any]
_CONFIG_CLASSES = (EngineConfig, CacheConfig, SchedulerConfig, RunnerConfig)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Exit status: 0 every line answered or recorded as invalid input; 1 the engine failed on some
# request (a retryable engine_error record each: --retry-failed runs them again); 2 usage (bad
# flags, files, a model that cannot load);
# 3 a fault (an output or error file could not be written, another run holds the output, a
# named model cannot be fetched into the cache): a rerun resumes; 130 / 143 stopped by SIGINT / SIGTERM: a rerun resumes.
EXIT_FAULT = 3
EXIT_SIGINT = 130  # the shell's 128 + signal number
EXIT_SIGTERM = 143


def main(
    argv: Sequence[str] | None = None,
    llm_factory: LLMFactory | None = None,
    tokenizer_factory: TokenizerFactory | None = None,
) -> int:
    """Run the command line; returns the exit status. `llm_factory(**engine_options)` builds the
    engine for `run`; `tokenizer_factory(model, tokenizer, max_model_len)` the tokenizer for `plan`."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args, llm_factory or _load_llm)
    if args.command == "plan":
        return plan(args, tokenizer_factory or _load_tokenizer, llm_factory or _load_llm)
    build_parser().print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treebatch", description="Offline large-batch LLM inference.")
    parser.add_argument("--version", action="version", version=f"treebatch {_version()}")
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser(
        "run",
        help="answer an OpenAI Batch API input file",
        description="Answer every line of an OpenAI Batch API input file: results stream to the output "
        "file as they finish, failed lines to the error file. An existing output file is resumed.",
    )
    run_parser.add_argument("input", type=Path, help="input JSONL (custom_id, method, url, body per line)")
    run_parser.add_argument("-o", "--output", type=Path, required=True, help="output JSONL (successful results)")
    run_parser.add_argument(
        "--error-file", type=Path, default=None, help="error records (default: OUTPUT with .errors.jsonl)"
    )
    resume = run_parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true",
        help="skip requests already in the output/error files (the default when the output exists)",
    )
    resume.add_argument("--overwrite", action="store_true", help="start fresh, replacing the output/error files")
    run_parser.add_argument(
        "--retry-failed", action="store_true",
        help="on resuming, also run again the requests whose error records are retryable (engine errors); "
        "invalid input stays final",
    )
    run_parser.add_argument(
        "--ordered", action="store_true", help="write results in input order (early ones wait in a bounded buffer)"
    )
    _add_window_flag(run_parser)
    run_parser.add_argument("--summary", type=Path, default=None, help="write the run summary as JSON here")
    run_parser.add_argument(
        "--fsync-interval", type=float, default=5.0, metavar="SECONDS",
        help="fsync the output at most this often (default: 5; 0: after every line)",
    )
    run_parser.add_argument(
        "--progress-interval", type=float, default=5.0, metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: 5)",
    )
    scale = run_parser.add_argument_group("scaling out (Ray)")
    scale.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Ray replicas, sharded by prefix group: a cluster's address (HOST:PORT, or auto), "
        "or none to start Ray on this machine; needs pip install 'treebatch[ray]'",
    )
    scale.add_argument("--num-replicas", type=int, default=2, help="Ray replicas, each one LLM (default: 2)")
    scale.add_argument("--replica-cpus", type=float, default=1, help="CPUs (and threads) per replica (default: 1)")
    scale.add_argument("--replica-gpus", type=float, default=0, help="GPUs per replica (default: 0)")
    _add_engine_flags(run_parser)

    plan_parser = commands.add_parser(
        "plan",
        help="validate an input file and show its prefix-tree plan (loads only the tokenizer)",
        description="Validate every line and analyse the batch's prefix sharing as `run` would plan it, "
        "without loading model weights.",
    )
    plan_parser.add_argument("input", type=Path, help="input JSONL")
    plan_parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    plan_parser.add_argument(
        "--predict",
        action="store_true",
        help="also predict the run time with and without prefix sharing from this machine's calibration "
        "(loads the model to read or measure the calibration; still generates nothing)",
    )
    _add_window_flag(plan_parser)
    _add_engine_flags(plan_parser)
    return parser


def _add_window_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, metavar="N",
        help=f"requests read, tokenized and planned together (default: {DEFAULT_WINDOW})",
    )


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine options")
    for name, base, default in engine_fields():
        _add_engine_flag(engine, name, base, default)


def engine_fields() -> list[tuple[str, type, Any]]:
    """(name, scalar type, default) of every flat option `EngineConfig.from_kwargs` accepts."""
    out = []
    for cls in _CONFIG_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base = _scalar_type(hints[f.name])
            if base is None:  # nested configs: their own fields are listed instead
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, base, default))
    return out


def run(args: argparse.Namespace, llm_factory: LLMFactory) -> int:
    if not args.input.is_file():
        print(f"treebatch: error: no such input file: {args.input}", file=sys.stderr)
        return 2
    error_file = args.error_file or default_error_file(args.output)
    if args.input.resolve() in {p.resolve() for p in (args.output, error_file) if p.exists()} or error_file == args.output:
        print("treebatch: error: the input, output and error files must differ", file=sys.stderr)
        return 2
    if args.window < 1:
        print("treebatch: error: --window must be at least 1", file=sys.stderr)
        return 2
    if args.ray is not None:
        if args.num_replicas < 1 or args.replica_cpus <= 0:
            print("treebatch: error: --num-replicas must be at least 1 and --replica-cpus positive", file=sys.stderr)
            return 2
        try:
            import ray  # noqa: F401
        except ImportError:
            from treebatch.distributed.ray_llm import RAY_MISSING

            print(f"treebatch: error: {RAY_MISSING}", file=sys.stderr)
            return 2
        llm_factory = _ray_factory(args)
    if args.retry_failed and args.overwrite:
        print("treebatch: error: --retry-failed resumes a run; --overwrite starts afresh", file=sys.stderr)
        return 2
    options = _engine_options(args)
    if options is None:
        return 2
    try:
        with OutputLock(args.output):
            return _run_locked(args, llm_factory, options, error_file)
    except OutputLocked as exc:
        print(f"treebatch: error: {exc}", file=sys.stderr)
        return EXIT_FAULT


def _run_locked(args: argparse.Namespace, llm_factory: LLMFactory, options: dict[str, Any], error_file: Path) -> int:
    """`run` once the output is this process's alone."""
    finished = FinishedSet()
    if args.overwrite or not (args.resume or args.output.exists()):
        for path in (args.output, error_file):
            path.unlink(missing_ok=True)
    else:
        try:
            retried = drop_retryable(error_file) if args.retry_failed else 0
        except OSError as exc:
            print(f"treebatch: error: cannot rewrite {error_file} for --retry-failed: {exc}", file=sys.stderr)
            return EXIT_FAULT
        if args.retry_failed:
            print(f"treebatch: --retry-failed: {retried} retryable error records taken out of {error_file}; "
                  "their requests run again", file=sys.stderr)
        try:
            finished = scan_finished([args.output, error_file])
        except ResumeError as exc:
            print(f"treebatch: error: cannot resume: {exc}", file=sys.stderr)
            return 2
        torn = f"; dropped a torn last line ({finished.num_dropped_bytes} bytes)" if finished.num_dropped_bytes else ""
        print(
            f"treebatch: resuming: {finished.num_records} requests already in {args.output} / {error_file} "
            f"are skipped{torn} (--overwrite starts fresh)",
            file=sys.stderr,
        )
    job_options = JobOptions(
        input=args.input, output=args.output, error_file=error_file, window=args.window, ordered=args.ordered,
        fsync_interval=max(args.fsync_interval, 0.0),
    )
    total = max(count_lines(args.input) - finished.num_records, 0)
    job: BatchJob | None = None
    progress: JobProgress | None = None
    with _stop_on_signals():
        try:
            try:
                llm = llm_factory(**options)
            except _MODEL_ERRORS as exc:
                return _model_error(exc)
            progress = JobProgress(total, interval=args.progress_interval)
            job = BatchJob(llm, job_options, finished, progress)
            status = job.run()
        except _Interrupted as exc:
            status = exc.status
            print("treebatch: stopped by signal; finished results are saved, run again to resume", file=sys.stderr)
        except WriteFault as exc:
            status = EXIT_FAULT
            print(f"treebatch: error: {exc}. Every result written before it is kept and no request was "
                  "marked failed for it; free the space (or lift the limit) and run the same command again "
                  "to resume", file=sys.stderr)
        finally:
            if progress is not None:
                progress.close()
    if job is None or progress is None:
        return status
    summary = progress.summary(
        requests_skipped=finished.num_records, windows=job.num_windows, output=str(args.output),
        error_file=str(error_file), exit_status=status, model=job.llm.model_name,
    )
    errors_note = f", errors -> {error_file}" if summary["requests_failed"] else ""
    print(f"{format_summary(summary)} -> {args.output}{errors_note}", file=sys.stderr)
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return status


def plan(args: argparse.Namespace, tokenizer_factory: TokenizerFactory, llm_factory: LLMFactory | None = None) -> int:
    from treebatch.batch.plan import analyze_batch, format_plan
    from treebatch.batch.prompts import PromptTokenizer

    if not args.input.is_file():
        print(f"treebatch: error: no such input file: {args.input}", file=sys.stderr)
        return 2
    if args.window < 1:
        print("treebatch: error: --window must be at least 1", file=sys.stderr)
        return 2
    options = _engine_options(args)
    if options is None:
        return 2
    config = EngineConfig.from_kwargs(**options)
    try:
        loaded = tokenizer_factory(config.model, config.tokenizer, config.max_model_len)
        predict = llm_factory(**options).engine.predict if args.predict and llm_factory else None
    except _MODEL_ERRORS as exc:
        return _model_error(exc)
    analysis = analyze_batch(
        args.input, PromptTokenizer.of(loaded), args.window, config, model_name=loaded.model_name, predict=predict
    )
    print(json.dumps(analysis, indent=1) if args.json else format_plan(analysis))
    return 0


class _Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds the job (closing its files) like KeyboardInterrupt."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    # Raising from the handler stops the engine mid-step; every result already yielded is on
    # disk (each line is flushed as written), and the writers are closed on the way out.
    def stop(signum: int, frame: Any) -> None:
        raise _Interrupted(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)

    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _engine_options(args: argparse.Namespace) -> dict[str, Any] | None:
    options = {name: getattr(args, name) for name, _, _ in engine_fields() if hasattr(args, name)}
    try:
        EngineConfig.from_kwargs(**options)  # fail on bad flags before reading or loading anything
    except (AssertionError, TypeError, ValueError) as exc:
        print(f"treebatch: error: invalid engine options: {exc or 'out of range'}", file=sys.stderr)
        return None
    return options


def _load_llm(**options: Any) -> Any:
    from treebatch.llm import LLM  # deferred: importing torch and the model is slow

    return LLM(**options)


# What making an engine or tokenizer raises for a model it cannot have: one line, no traceback.
_MODEL_ERRORS = (ModelCacheError, ModelLoadError, FileNotFoundError, MemoryError)


def _model_error(exc: BaseException) -> int:
    """Say why the model cannot be had; the exit status: a fault (3) when the cache or the
    registry is to blame, usage (2) when the model itself is."""
    if isinstance(exc, ModelCacheError):
        print(f"treebatch: error: cannot fetch the model: {exc}; run again once fixed", file=sys.stderr)
        return EXIT_FAULT
    print(f"treebatch: error: cannot load the model: {exc}", file=sys.stderr)
    return 2


def _ray_factory(args: argparse.Namespace) -> LLMFactory:
    def make(**options: Any) -> Any:
        from treebatch.distributed.ray_llm import RayLLM

        address = None if args.ray == "local" else args.ray
        return RayLLM(address, args.num_replicas, args.replica_cpus, args.replica_gpus, **options)

    return make


def _load_tokenizer(model: str | None, tokenizer: str | None, max_model_len: int | None) -> Any:
    from treebatch.tokenizer import load_tokenizer_only

    return load_tokenizer_only(model, tokenizer, max_model_len)


def _add_engine_flag(group: argparse._ArgumentGroup, name: str, base: type, default: Any) -> None:
    flag = "--" + name.replace("_", "-")
    shown = "automatic" if default is None else default
    if base is bool:
        group.add_argument(
            flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
            help=f"(default: {shown})",
        )
        return
    # Memory budgets are bytes; accept "4G"-style sizes too.
    is_size = name.endswith("_memory")
    group.add_argument(
        flag, dest=name, type=parse_size if is_size else base, default=argparse.SUPPRESS,
        metavar="SIZE" if is_size else name.upper(),
        help=f"(default: {shown})",
    )


def _scalar_type(hint: Any) -> type | None:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (bool, int, float, str) else None


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512M", "4G" or "4GiB"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treebatch")
    except PackageNotFoundError:
        return "unknown"
