"""Request typing and the upload handler that enforces the per-file size limit."""

from __future__ import annotations

from collections.abc import Iterator
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


def event_stream_response(events: Iterator[str]) -> StreamingHttpResponse:
    """Server-sent events, sent as they are produced (never cached or buffered on the way)."""
    response = StreamingHttpResponse(events, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold tokens back
    return response
