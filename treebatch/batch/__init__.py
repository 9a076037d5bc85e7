"""OpenAI Batch API files: read and validate input lines, tokenize them, write results, resume."""

from treebatch.batch.prompts import PreparedRequest, PromptTokenizer, prepare_window
from treebatch.batch.reader import BatchEntry, LineError, parse_lines, read_batch, windows
from treebatch.batch.requests import ParsedRequest, RequestError, fit_context, parse_body
from treebatch.batch.writer import BatchWriter, chat_body, completion_body

__all__ = [
    "BatchEntry",
    "BatchWriter",
    "LineError",
    "ParsedRequest",
    "PreparedRequest",
    "PromptTokenizer",
    "RequestError",
    "chat_body",
    "completion_body",
    "fit_context",
    "parse_body",
    "parse_lines",
    "prepare_window",
    "read_batch",
    "windows",
]
