"""OpenAI Batch API files: read and validate input lines, write output lines."""

from treebatch.batch.reader import BatchEntry, LineError, parse_lines, read_batch
from treebatch.batch.requests import ParsedRequest, RequestError, parse_body, prepare
from treebatch.batch.writer import BatchWriter, chat_body, completion_body

__all__ = [
    "BatchEntry",
    "BatchWriter",
    "LineError",
    "ParsedRequest",
    "RequestError",
    "chat_body",
    "completion_body",
    "parse_body",
    "parse_lines",
    "prepare",
    "read_batch",
]
