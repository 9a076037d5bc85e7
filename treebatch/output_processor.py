"""Output processing, one state per request: incremental detokenizing, stop strings, the finish
reason and stop reason, logprobs with their decoded tokens, the final text.

The engine tells the processor each sampled token (`add_token`); a True answer means a stop string
has appeared and the engine ends the request. When a request finishes, `finish` decides once what
its completion is; the facade takes it with `pop(request_id).completion(index)`.

Text is decoded incrementally (the prefix/read offset technique): a state keeps two offsets into
its token ids and decodes only the window `token_ids[prefix_offset:]`; the text past the decode of
`token_ids[prefix_offset:read_offset]` is new. New text is committed (and the offsets moved) only
when it does not end in U+FFFD, the replacement character of a UTF-8 sequence that the next token
may still complete, so a window always starts on a character boundary and the committed pieces
join to exactly the full decode for byte-level BPE (GPT-2 style) and for decoders that strip a
leading space, since the window's first tokens are decoded in both halves. Tokenizers that clean
up spaces around punctuation after decoding (WordPiece-style `clean_up_tokenization_spaces`) are
decoded window by window the same way, which can differ from the full decode at a window's edge.

Stop strings are searched only in the text that changed in this step plus the `max(len(stop)) - 1`
characters before it; the uncommitted tail (what ends in U+FFFD) is searched too, so a stop string
is found at the same token as a search of the whole decoded text would find it. A request without
stop strings decodes nothing until it finishes, then all of its tokens at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from treebatch.core.request import Request, RequestStatus
from treebatch.outputs import CompletionOutput, Logprob, SampleLogprobs
from treebatch.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[list[int]], str]


def make_decode(tokenizer: Any, skip_special_tokens: bool = True) -> Decode:
    """`token ids -> text` as `tokenizer.decode(ids, skip_special_tokens=...)` gives it; through the
    Rust tokenizer directly when that is all `decode` would do (a fast tokenizer that does not
    clean up spaces), which saves the Python wrapper's overhead on every small window."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        decode_backend = backend.decode
        return lambda ids: decode_backend(ids, skip_special_tokens=skip_special_tokens)
    decode_python = tokenizer.decode
    return lambda ids: decode_python(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Token ids in, text out, decoding only a small window at the tail each time."""

    __slots__ = ("_decode", "token_ids", "prefix_offset", "read_offset", "_prefix_text", "_pieces", "num_chars")

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # text of tokens up to here is committed
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._pieces: list[str] = []  # committed text, in pieces (joined once, at the end)
        self.num_chars = 0  # committed characters

    def append(self, token_id: int) -> None:
        """Add a token without decoding (a later `decode_tail` or `flush` decodes it)."""
        self.token_ids.append(token_id)

    def decode_tail(self) -> str:
        """Decode the window; commit its new text unless that ends mid-character. Returns the text
        past the committed text, `num_chars` before the call: what was committed now plus the
        uncommitted tail (which may end in U+FFFD and change with the next token)."""
        window = self._decode(self.token_ids[self.prefix_offset :])
        tail = window[len(self._prefix_text) :]
        if tail and not tail.endswith(_REPLACEMENT_CHAR):
            self._commit(tail)
        return tail

    def flush(self) -> str:
        """Commit everything left (even a tail that ends mid-character); return the whole text."""
        if self.read_offset < len(self.token_ids):
            window = self._decode(self.token_ids[self.prefix_offset :])
            tail = window[len(self._prefix_text) :]
            if tail:
                self._pieces.append(tail)
                self.num_chars += len(tail)
            self.prefix_offset = self.read_offset = len(self.token_ids)
            self._prefix_text = ""
        text = "".join(self._pieces)
        self._pieces = [text]
        return text

    def _commit(self, tail: str) -> None:
        self._pieces.append(tail)
        self.num_chars += len(tail)
        ids = self.token_ids
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self._prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])


def find_first_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in `text[start:]` (ties: the first in `stops`), as (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


class RequestState:
    """One request's output: its tokens, text, stop-string search and, once finished, its decisions."""

    __slots__ = (
        "request_id",
        "params",
        "detokenizer",
        "_stops",
        "_overlap",
        "_tail",
        "stop_string",
        "stop_index",
        "text",
        "finish_reason",
        "stop_reason",
        "logprobs",
        "cumulative_logprob",
    )

    def __init__(self, request_id: str, params: SamplingParams, decode: Decode) -> None:
        self.request_id = request_id
        self.params = params
        self.detokenizer = IncrementalDetokenizer(decode)
        self._stops = params.stop_strings
        self._overlap = max((len(s) for s in self._stops), default=1) - 1  # chars a stop can reach back
        self._tail = ""  # the last `_overlap` committed characters
        self.stop_string: str | None = None  # the stop string found, at `stop_index` of the text
        self.stop_index = -1
        # Decided by `finish`:
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: SampleLogprobs | None = None
        self.cumulative_logprob: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.token_ids

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int) -> bool:
        """Take the request's new token; True when the text now holds a stop string (the first
        time only: the request is to end here)."""
        detokenizer = self.detokenizer
        detokenizer.append(token_id)
        if not self._stops or self.stop_string is not None:
            return False
        committed = detokenizer.num_chars
        tail = detokenizer.decode_tail()
        if not tail:
            return False
        # The text that changed starts at `committed`; a stop string ending in it starts at most
        # `_overlap` characters before it.
        window = self._tail + tail
        hit = find_first_stop(window, self._stops)
        if hit is not None:
            self.stop_index = committed - len(self._tail) + hit[0]
            self.stop_string = hit[1]
            return True
        if self._overlap and detokenizer.num_chars > committed:  # the tail was committed: move on
            self._tail = window[-self._overlap :]
        return False

    def finish(self, request: Request, decode_token: Callable[[int], str]) -> None:
        """Decide the completion of a request the scheduler has finished."""
        text = self.detokenizer.flush()
        stop = self.stop_string
        if stop is not None:
            end = self.stop_index + len(stop) if self.params.include_stop_str_in_output else self.stop_index
            text = text[:end]
            self.finish_reason = "stop"
            self.stop_reason = stop
        else:
            self.finish_reason = "length" if request.status == RequestStatus.FINISHED_LENGTH else "stop"
            self.stop_reason = request.stop_reason  # a stop token id, or None (EOS, length, abort)
        self.text = text
        if self.params.logprobs is not None:
            entries = request.output_logprobs
            self.logprobs = [
                {token: Logprob(value, rank, decode_token(token)) for token, (value, rank) in entry.items()}
                for entry in entries
            ]
            self.cumulative_logprob = float(
                sum(entry[token][0] for entry, token in zip(entries, self.detokenizer.token_ids))
            )

    def completion(self, index: int) -> CompletionOutput:
        assert self.is_finished, f"request {self.request_id!r} has not finished"
        return CompletionOutput(
            index=index,
            text=self.text or "",
            token_ids=self.detokenizer.token_ids,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            stop_reason=self.stop_reason,
            cumulative_logprob=self.cumulative_logprob,
        )


class OutputProcessor:
    """The engine's one output processor: a RequestState per live request that samples."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._decoders: dict[bool, Decode] = {}
        self._token_texts: dict[int, str] = {}  # token id -> its text alone, for logprobs

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        decode = self._decoders.get(params.skip_special_tokens)
        if decode is None:
            decode = self._decoders[params.skip_special_tokens] = make_decode(self.tokenizer, params.skip_special_tokens)
        self.states[request.request_id] = RequestState(request.request_id, params, decode)

    def add_token(self, request_id: str, token_id: int) -> bool:
        """The request's new token; True when a stop string has just appeared."""
        return self.states[request_id].add_token(token_id)

    def finish(self, request: Request) -> None:
        self.states[request.request_id].finish(request, self._token_text)

    def pop(self, request_id: str) -> RequestState:
        return self.states.pop(request_id)

    def discard(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text
