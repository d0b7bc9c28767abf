"""The OpenAI-compatible API: /v1/models and /v1/chat/completions, with per-user tokens.

Wire format follows OpenAI's chat completions, so the official client works unchanged. The
retrieved passages ride along in an extra `sources` field that clients may ignore.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from functools import wraps

from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from slmstudio.http import client_gone, event_stream_response, stream_slot
from training.ml.prompt import Turn

from . import services
from .engines.llama import GenerationResult

View = Callable[..., HttpResponse]


def _error(status: int, message: str, kind: str, code: str | None = None) -> JsonResponse:
    return JsonResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )


def _token_required(view: View) -> View:
    @wraps(view)
    def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
        user = services.api_token_user(raw=raw.strip()) if scheme.lower() == "bearer" and raw else None
        if user is None:
            return _error(
                401,
                "Missing or invalid API token. Create one on your settings page and send it as "
                "'Authorization: Bearer <token>'.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return view(request, user, *args, **kwargs)

    return wrapped


@csrf_exempt
@require_GET
@_token_required
def models(request: HttpRequest, user: AbstractBaseUser) -> JsonResponse:
    data = [
        {
            "id": v.api_id,
            "object": "model",
            "created": int(v.created_at.timestamp()),
            "owned_by": v.project.slug,
        }
        for v in services.versions_for_user(user=user).order_by("project__slug", "number")
    ]
    return JsonResponse({"object": "list", "data": data})


def _text_of(content: object) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


@csrf_exempt
@require_POST
@_token_required
def chat_completions(request: HttpRequest, user: AbstractBaseUser) -> HttpResponse:
    try:
        body = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "The request body is not valid JSON.", "invalid_request_error")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_request_error")
    model_id = body.get("model")
    version = services.version_by_api_id(user=user, api_id=str(model_id or ""))
    if version is None:
        return _error(404, f"The model '{model_id}' does not exist or you have no access to it.",
                      "invalid_request_error", "model_not_found")  # fmt: skip
    turns = [
        Turn(m.get("role"), _text_of(m.get("content")))
        for m in body.get("messages") or []
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        return _error(400, "'messages' must end with a non-empty user message.", "invalid_request_error")
    # Missing or unusable values fall back to the chat page's defaults inside clamped().
    chat = services.ChatSettings.clamped(
        top_k=body.get("top_k"),
        temperature=body.get("temperature"),
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
    )
    release = stream_slot()
    if release is None:
        busy = _error(
            503, "The server is answering as many requests as it can; retry shortly.", "server_error"
        )
        busy["Retry-After"] = "10"
        return busy
    try:
        answer = services.answer_start(
            version=version, question=turns[-1].content, history=turns[:-1], chat=chat,
            should_stop=client_gone(request),
        )  # fmt: skip
    except BaseException:
        release()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": version.api_id}
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return event_stream_response(_stream(meta, answer, include_usage), on_close=release)
    try:
        result = answer.complete()
    finally:
        release()
    return JsonResponse(
        meta
        | {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": _finish(result.finish_reason),
                }
            ],
            "usage": _usage(result),
            "sources": answer.sources,
        }
    )


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _stream(meta: dict, answer: services.Answer, include_usage: bool) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        payload = meta | {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        } | extra  # fmt: skip
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, sources=answer.sources)
        for piece in answer.pieces:
            yield chunk({"content": piece})
        yield chunk({}, _finish(answer.result.finish_reason))
        if include_usage:
            usage = meta | {"object": "chat.completion.chunk", "choices": [], "usage": _usage(answer.result)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        answer.pieces.close()  # type: ignore[attr-defined]  # a client that hangs up stops generation
