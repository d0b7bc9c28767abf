"""Structured logs: every line says which build, document or request it concerns.

`log_context(build=12, step="lora")` adds fields to every log record written inside it (in this
thread or asyncio task: a context variable), whichever logger writes it: our code, Celery's, a
library's. LOG_FORMAT=json writes one JSON object a line for a log collector; plain text
appends the fields as `build=12 step=lora`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

# Never mutated: log_context sets a new dict, so a shared empty default is safe.
_EMPTY: dict[str, Any] = {}
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default=_EMPTY)  # noqa: B039


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = _context.set(_context.get() | {k: v for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the current context onto the record (as `record.context`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get()
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = getattr(record, "context", None)
        if context:
            # Escaped: a request path may carry a decoded newline, which would forge a log line.
            text += " " + " ".join(f"{k}={_escaped(v)}" for k, v in context.items())
        return text


def _escaped(value: Any) -> str:
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        entry.update(getattr(record, "context", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# What a proxy's request id looks like (uuid, hex, base64url); anything else gets our own.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestContextMiddleware:
    """Gives each web request an id (the proxy's X-Request-ID when it sends one) for its log
    lines, and returns it in the response so a user's report can be found in the logs."""

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response

    def __call__(self, request):  # type: ignore[no-untyped-def]
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        with log_context(request=request_id, path=request.path):
            response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response
