"""Request typing, the upload handler that enforces the per-file size limit, and streamed
responses: server-sent events, the process's limit on streams, and noticing a client that left."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http import HttpRequest, StreamingHttpResponse

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from django_htmx.middleware import HtmxDetails


class HtmxRequest(HttpRequest):
    user: User
    htmx: HtmxDetails


class AuthenticatedRequest(HtmxRequest):
    pass


class MaxSizeUploadHandler(FileUploadHandler):
    """Skips any uploaded file larger than settings.MAX_UPLOAD_BYTES while it streams in.

    It sits first in FILE_UPLOAD_HANDLERS, so the chunks of an oversized file never reach the
    temporary-file handler: nothing of it is stored. The names of skipped files are kept on the
    request (`request.oversized_uploads`) so the view can tell the user which ones and why.
    """

    def new_file(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().new_file(*args, **kwargs)
        self._received = 0
        if not hasattr(self.request, "oversized_uploads"):
            self.request.oversized_uploads = []  # type: ignore[union-attr]

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self._received += len(raw_data)
        if self._received > settings.MAX_UPLOAD_BYTES:
            self.request.oversized_uploads.append(self.file_name)  # type: ignore[union-attr]
            raise SkipFile
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


def event_stream_response(
    events: Iterator[str], *, on_close: Callable[[], None] | None = None
) -> StreamingHttpResponse:
    """Server-sent events, sent as they are produced (never cached or buffered on the way).
    `on_close` runs once when the response is closed: finished, failed or abandoned."""
    content = _ClosingIterator(events, on_close) if on_close else events
    response = StreamingHttpResponse(content, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold tokens back
    return response


class _ClosingIterator:
    """Iterates `events`; closing it closes them and then calls `on_close`, once. Django closes a
    streamed response's content when the server closes the response, even if it was never read
    (a generator's own `finally` would not run then)."""

    def __init__(self, events: Iterator[str], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._events)

    def close(self) -> None:
        try:
            if hasattr(self._events, "close"):
                self._events.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


# --- Streams: how many at once, and whether their client is still there ---------------------

_streams_lock = threading.Lock()
_streams_open = 0


def stream_slot() -> Callable[[], None] | None:
    """Take one of this process's places for a streamed answer: the function that gives it back,
    or None when settings.STREAMS_PER_PROCESS are taken.

    Under gunicorn's threads a stream holds a thread for as long as it waits for the model and
    generates. Past the limit a stream is refused at once (the caller answers "busy, try again")
    instead of queueing behind the others, so the rest of the threads always serve pages.
    """
    global _streams_open
    with _streams_lock:
        if _streams_open >= settings.STREAMS_PER_PROCESS:
            return None
        _streams_open += 1
    released = threading.Event()

    def release() -> None:
        global _streams_open
        if not released.is_set():
            released.set()
            with _streams_lock:
                _streams_open -= 1

    return release


def streams_open() -> int:
    return _streams_open


def _never() -> bool:
    return False


def client_gone(request: HttpRequest) -> Callable[[], bool]:
    """A check that turns true once the client has closed its connection.

    A streamed answer learns that its reader left when writing the next token fails; one still
    waiting for the model (others are answered ahead of it) writes nothing, and would wait for
    its turn and generate for no one. gunicorn passes the request's socket to the application
    (`gunicorn.socket`); a peek that does not block tells whether the client hung up (end of
    stream, or a reset). Elsewhere (the development server, the test client) it never fires.
    """
    sock = request.META.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return _never

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, and quiet
        except ValueError:
            return False  # a TLS socket refuses flags: cannot tell, assume present
        except OSError:
            return True  # reset or closed

    return gone
