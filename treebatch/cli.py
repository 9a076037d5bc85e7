"""`treebatch run INPUT.jsonl -o OUTPUT.jsonl`: answer an OpenAI Batch API file offline.

Engine flags are generated from the config dataclasses, so a new config field is a
new flag without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from treebatch.batch.reader import BatchEntry, LineError, read_batch
from treebatch.batch.requests import RequestError, prepare
from treebatch.batch.writer import BatchWriter, chat_body, completion_body
from treebatch.config import CacheConfig, EngineConfig, SchedulerConfig

LLMFactory = Callable[..., Any]
_CONFIG_CLASSES = (EngineConfig, CacheConfig, SchedulerConfig)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def main(argv: Sequence[str] | None = None, llm_factory: LLMFactory | None = None) -> int:
    """Run the command line; returns the exit status. `llm_factory(**engine_options)` builds the engine."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args, llm_factory or _load_llm)
    build_parser().print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treebatch", description="Offline large-batch LLM inference.")
    parser.add_argument("--version", action="version", version=f"treebatch {_version()}")
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser(
        "run",
        help="answer an OpenAI Batch API input file",
        description="Answer every line of an OpenAI Batch API input file; write one output line per input line.",
    )
    run_parser.add_argument("input", type=Path, help="input JSONL (custom_id, method, url, body per line)")
    run_parser.add_argument("-o", "--output", type=Path, required=True, help="output JSONL (overwritten)")
    engine = run_parser.add_argument_group("engine options")
    for name, base, default in engine_fields():
        _add_engine_flag(engine, name, base, default)
    return parser


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
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        print("treebatch: error: the output file must differ from the input file", file=sys.stderr)
        return 2
    options = {name: getattr(args, name) for name, _, _ in engine_fields() if hasattr(args, name)}
    try:
        EngineConfig.from_kwargs(**options)  # fail on bad flags before reading or loading anything
    except (AssertionError, TypeError, ValueError) as exc:
        print(f"treebatch: error: invalid engine options: {exc or 'out of range'}", file=sys.stderr)
        return 2

    entries = list(read_batch(args.input))
    llm = llm_factory(**options)
    with BatchWriter(args.output) as writer:
        status = _answer(llm, entries, writer)
        print(
            f"treebatch: {writer.num_responses + writer.num_errors} requests: {writer.num_responses} answered, "
            f"{writer.num_errors} failed -> {args.output}",
            file=sys.stderr,
        )
    _print_summary(getattr(llm, "last_run_summary", None))
    return status


def _answer(llm: Any, entries: list[BatchEntry | LineError], writer: BatchWriter) -> int:
    """Write every line's result; one `generate` call for all valid lines so the engine plans them together."""
    ready: list[tuple[BatchEntry, dict[str, Any], Any]] = []
    for entry in entries:
        if isinstance(entry, LineError):
            writer.write_error(entry.custom_id, entry.code, entry.message)
            continue
        try:
            prompt, params = prepare(entry.request, llm)
        except RequestError as exc:
            writer.write_error(entry.custom_id, exc.code, f"line {entry.line}: {exc.message}")
            continue
        ready.append((entry, prompt, params))
    if not ready:
        return 0
    _warn_model_names(llm.model_name, [entry.request.model for entry, _, _ in ready])

    try:
        outputs = llm.generate([p for _, p, _ in ready], [s for _, _, s in ready], use_tqdm=True)
    except Exception as exc:
        # Every custom_id still gets its line, so a caller can tell "failed" from "missing".
        traceback.print_exc()
        for entry, _, _ in ready:
            writer.write_error(entry.custom_id, "engine_error", f"line {entry.line}: {type(exc).__name__}: {exc}")
        return 1

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id])

    for (entry, _, _), output in zip(ready, outputs, strict=True):
        request = entry.request
        make_body = chat_body if request.is_chat else completion_body
        writer.write_response(entry.custom_id, make_body(output, llm.model_name, request.logprobs, token_text))
    return 0


def _warn_model_names(served: str, requested: list[str | None]) -> None:
    # Batch files are often written for another provider; answering beats failing them all.
    others = sorted({name for name in requested if name and name != served})
    if others:
        print(
            f"treebatch: warning: requests name model(s) {', '.join(map(repr, others))}; serving {served!r}",
            file=sys.stderr,
        )


def _print_summary(summary: dict[str, Any] | None) -> None:
    if not summary:
        return
    items = ", ".join(f"{key}={_short(value)}" for key, value in summary.items())
    print(f"treebatch: run summary: {items}", file=sys.stderr)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _load_llm(**options: Any) -> Any:
    from treebatch.llm import LLM  # deferred: importing torch and the model is slow

    return LLM(**options)


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
