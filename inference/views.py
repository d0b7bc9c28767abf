from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from projects.http import project_context, project_or_404
from projects.models import Project
from slmstudio.http import AuthenticatedRequest, client_gone, event_stream_response, stream_slot
from training import services as training_services
from training.models import ModelVersion

from . import cards, comparison, services
from .models import ApiToken, Conversation, Message

log = logging.getLogger(__name__)

# The downloaded report inlines its styles on purpose (one file to share or archive), so it gets a
# policy of its own instead of the site's: those styles and data: pictures, no script, nothing
# fetched. The file carries it too (a <meta> tag), for when it is opened from disk.
REPORT_DOWNLOAD_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
)


def _version_for_user(request: AuthenticatedRequest, slug: str, number: int) -> tuple[Project, ModelVersion]:
    project = project_or_404(request, slug)
    return project, get_object_or_404(ModelVersion, project=project, number=number)


def _conversation_for_user(request: AuthenticatedRequest, version: ModelVersion, pk: int) -> Conversation:
    # Conversations are private to their author, even inside a shared project.
    return get_object_or_404(Conversation, pk=pk, version=version, user=request.user)


@login_required
@require_GET
def models(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Every version with its measured size, speed and quality, side by side, and a chart."""
    project = project_or_404(request, slug)
    rows = comparison.comparison_rows(list(services.project_versions(project=project)))
    context = project_context(request, project, "models") | {
        "rows": rows,
        "any_other_text": any(r.other_text for r in rows),
        "chart": comparison.size_quality_chart(rows),
    }
    return render(request, "inference/models.html", context)


@login_required
@require_GET
def report(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Every version's size, speed, quality and lineage on one printable page; `?download=1`
    gives it as a self-contained HTML file (styles inlined) to share or archive."""
    from django.contrib.staticfiles import finders
    from django.utils import timezone

    project = project_or_404(request, slug)
    rows = comparison.comparison_rows(list(services.project_versions(project=project)))
    download = request.GET.get("download") == "1"
    css = ""
    if download:
        paths = [finders.find(name) for name in ("css/app.css", "css/report.css")]
        css = "\n".join(Path(path).read_text(encoding="utf-8") for path in paths if path)
    context = project_context(request, project, "models") | {
        "rows": rows,
        "chart": comparison.size_quality_chart(rows),
        "now": timezone.now(),
        "inline_css": css,
        "download": download,
        "download_csp": REPORT_DOWNLOAD_CSP,
    }
    response = render(request, "inference/report.html", context)
    if download:
        response["Content-Disposition"] = f'attachment; filename="{project.slug}-report.html"'
        # Set here, so the site-wide middleware leaves it (it never replaces a policy a view set).
        response["Content-Security-Policy"] = f"{REPORT_DOWNLOAD_CSP}; frame-ancestors 'none'"
    return response


@login_required
@require_GET
def model_detail(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    project, version = _version_for_user(request, slug, number)
    context = project_context(request, project, "models") | {
        "version": version,
        "row": comparison.comparison_rows([version])[0],
        "filename": cards.gguf_filename(version),
        "commands": cards.llama_cpp_commands(version),
        "api_base": request.build_absolute_uri("/v1"),
        "changes": training_services.version_changes(version=version),
    }
    return render(request, "inference/model_detail.html", context)


@login_required
@require_POST
def refresh(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    """Build the version again from the current documents; show that build."""
    _, version = _version_for_user(request, slug, number)
    try:
        build = training_services.version_refresh(version=version, user=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("inference-model-detail", slug, number)
    return redirect(build)


@login_required
@require_GET
def download_gguf(request: AuthenticatedRequest, slug: str, number: int) -> FileResponse:
    _, version = _version_for_user(request, slug, number)
    if not version.gguf_file.is_file():
        raise Http404("The model file is missing on the server.")
    return FileResponse(
        version.gguf_file.open("rb"), as_attachment=True, filename=cards.gguf_filename(version)
    )


@login_required
@require_GET
def download_modelfile(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    _, version = _version_for_user(request, slug, number)
    response = HttpResponse(cards.ollama_modelfile(version), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="Modelfile"'
    return response


@login_required
@require_GET
def download_card(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    _, version = _version_for_user(request, slug, number)
    response = HttpResponse(cards.model_card(version), content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{slug}-v{number}-model-card.md"'
    return response


@login_required
@require_GET
def chat(
    request: AuthenticatedRequest, slug: str, number: int, conversation: int | None = None
) -> HttpResponse:
    project, version = _version_for_user(request, slug, number)
    current = _conversation_for_user(request, version, conversation) if conversation else None
    thread = list(current.messages.all()) if current else []
    context = project_context(request, project, "models") | {
        "version": version,
        "conversation": current,
        "conversations": version.conversations.filter(user=request.user)[:50],
        "thread": [(m, services.message_html(m) if m.role == Message.Role.ASSISTANT else "") for m in thread],
        # A question whose answer never came (the page was closed mid-stream) is answered on load.
        "pending": thread[-1] if thread and thread[-1].role == Message.Role.USER else None,
        "chat": services.ChatSettings(),
        "gguf_bytes": version.gguf_file.stat().st_size if version.gguf_file.exists() else None,
    }
    return render(request, "inference/chat.html", context)


@login_required
@require_POST
def ask(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    """Store the question; the answer streams from `stream`. Returns what the page needs to show it."""
    project, version = _version_for_user(request, slug, number)
    question = request.POST.get("question", "").strip()
    if not question:
        return JsonResponse({"error": "Type a question first."}, status=400)
    conversation_id = request.POST.get("conversation")
    if conversation_id and conversation_id.isdigit():
        conversation = _conversation_for_user(request, version, int(conversation_id))
    else:
        conversation = services.conversation_start(
            version=version, user=request.user, first_question=question
        )
    chat_settings = services.ChatSettings.clamped(
        top_k=request.POST.get("top_k"),
        temperature=request.POST.get("temperature"),
        max_tokens=request.POST.get("max_tokens"),
    )
    message = services.message_ask(conversation=conversation, question=question, chat=chat_settings)
    conversation_url = reverse("inference-conversation", args=[project.slug, version.number, conversation.pk])
    if not request.headers.get("X-Chat"):
        return redirect(conversation_url)
    return JsonResponse(
        {
            "conversation": conversation.pk,
            "conversation_url": conversation_url,
            "stream_url": reverse("inference-stream", args=[project.slug, version.number, message.pk]),
            "question_html": render_to_string(
                "inference/_message.html", {"message": message, "project": project}, request=request
            ),
        }
    )


BUSY_MESSAGE = (
    "The server is writing as many answers as it can right now, so this one could not start. "
    "Reload the page in a minute to get it."
)


def _sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@login_required
@require_GET
def stream(request: AuthenticatedRequest, slug: str, number: int, message: int) -> HttpResponse:
    """Server-sent events: `token` pieces as they are generated, then `done` with the final HTML."""
    project, version = _version_for_user(request, slug, number)
    question = get_object_or_404(
        Message,
        pk=message,
        role=Message.Role.USER,
        conversation__version=version,
        conversation__user=request.user,
    )

    def done_event(reply: Message) -> str:
        html = render_to_string(
            "inference/_message.html",
            {"message": reply, "html": services.message_html(reply), "project": project},
            request=request,
        )
        return _sse("done", {"html": html})

    def events() -> Iterator[str]:
        existing = Message.objects.filter(reply_to=question).first()
        if existing:  # answered already (a reload, a second tab): send it whole
            yield done_event(existing)
            return
        yield ": generating\n\n"  # flushes headers at once, so the browser shows the stream started
        try:
            for kind, value in services.answer_stream(question=question, should_stop=client_gone(request)):
                yield _sse("token", value) if kind == "token" else done_event(value)  # type: ignore[arg-type]
        except Exception:
            # Headers are sent: the page can only learn of a failure from an event in the stream.
            log.exception("answering message %s failed", question.pk)
            yield _sse(
                "failure",
                {
                    "message": "The model could not answer: the server hit an error. Try again; if it keeps happening, rebuild the model."
                },
            )

    release = stream_slot()
    if release is None:
        # Sent as an event, so the page shows it; the question stays unanswered until reloaded.
        return event_stream_response(iter([_sse("failure", {"message": BUSY_MESSAGE})]))
    return event_stream_response(events(), on_close=release)


@login_required
@require_GET
def retrieve(request: AuthenticatedRequest, slug: str, number: int) -> HttpResponse:
    """Retrieval only: the passages the model would get for this question, and why."""
    project, version = _version_for_user(request, slug, number)
    query = request.GET.get("question", "").strip()
    chat_settings = services.ChatSettings.clamped(top_k=request.GET.get("top_k"))
    hits = services.retrieve(version=version, query=query, k=max(chat_settings.top_k, 1)) if query else []
    context = {
        "project": project,
        "query": query,
        "results": list(zip(services.sources_from_hits(hits), hits, strict=True)),
    }
    return render(request, "inference/_retrieval.html", context)


# --- Settings: API tokens ------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def settings_page(request: AuthenticatedRequest) -> HttpResponse:
    new_token = None
    if request.method == "POST":
        _, new_token = services.api_token_create(user=request.user, name=request.POST.get("name", ""))
    context = {
        "tokens": request.user.api_tokens.all(),
        "new_token": new_token,
        "api_base": request.build_absolute_uri("/v1"),
        "example_model": services.versions_for_user(user=request.user).first(),
    }
    return render(request, "inference/settings.html", context)


@login_required
@require_POST
def token_revoke(request: AuthenticatedRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)
    token.delete()
    messages.success(request, f"Token “{token.name}” revoked: programs using it can no longer connect.")
    return redirect("inference-settings")
