"""Answering questions: retrieval, prompt, generation; conversations and API tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from ops.metrics import answer_observed
from projects.models import Project
from training.ml.prompt import Passage, Turn, build_messages
from training.ml.rag import Hit, HybridIndex
from training.models import ModelVersion

from .engines.guard import AnswerGuard, guard_text, guarded, policy_for, source_texts
from .engines.llama import GenerationConfig, GenerationResult, engines
from .engines.render import render_answer
from .models import ApiToken, Conversation, Message
from .retriever import index_for

# The bundled model was trained with a 2k-token window (8k nominal); 2k keeps CPU prompts fast.
N_CTX = 2048


@dataclass(frozen=True)
class ChatSettings:
    top_k: int = 4  # passages put in front of the model
    temperature: float = 0.2  # low: answers should stick to the passages
    max_tokens: int = 256

    @classmethod
    def clamped(
        cls, *, top_k: object = None, temperature: object = None, max_tokens: object = None
    ) -> ChatSettings:
        """Settings from user input, each forced into its sane range (bad values fall back)."""
        default = cls()
        return cls(
            top_k=_clamp(top_k, int, 0, 10, default.top_k),
            temperature=_clamp(temperature, float, 0.0, 1.5, default.temperature),
            max_tokens=_clamp(max_tokens, int, 16, 1024, default.max_tokens),
        )

    def as_dict(self) -> dict[str, float | int]:
        return {"top_k": self.top_k, "temperature": self.temperature, "max_tokens": self.max_tokens}


def _clamp(value: object, kind: type, low: float, high: float, default: float):  # type: ignore[no-untyped-def]
    try:
        number = kind(value)  # type: ignore[call-arg]
    except (TypeError, ValueError):
        return default
    return min(max(number, kind(low)), kind(high))


def versions_for_user(*, user: AbstractBaseUser) -> QuerySet[ModelVersion]:
    return ModelVersion.objects.filter(project__memberships__user=user).select_related("project")


def version_by_api_id(*, user: AbstractBaseUser, api_id: str) -> ModelVersion | None:
    slug, _, number = api_id.rpartition("/v")
    if not slug or not number.isdigit():
        return None
    return versions_for_user(user=user).filter(project__slug=slug, number=int(number)).first()


# --- Retrieval and answers -----------------------------------------------------------------


def retrieve(*, version: ModelVersion, query: str, k: int, mode: str = "hybrid") -> list[Hit]:
    index = index_for(version)
    if index is None or k <= 0 or not query.strip():
        return []
    return index.search(query, k=k, mode=mode)


def sources_from_hits(hits: list[Hit]) -> list[dict]:
    return [
        {
            "n": n,
            "document_id": hit.chunk.document_id,
            "title": hit.chunk.document_title,
            "location": hit.chunk.location,
            "section_index": hit.chunk.section_index,
            "page": hit.chunk.page,
            "text": hit.chunk.text,
            "score": round(hit.score, 4),
        }
        for n, hit in enumerate(hits, start=1)
    ]


@dataclass
class Answer:
    """A streamed answer: iterate `pieces`; `result` holds the text and usage once it ends."""

    sources: list[dict]
    pieces: Iterator[str]
    result: GenerationResult = field(default_factory=GenerationResult)

    def complete(self) -> GenerationResult:
        """Run the generation to its end without streaming (API without `stream`, the CLI)."""
        for _ in self.pieces:
            pass
        return self.result


def answer_start(
    *,
    version: ModelVersion,
    question: str,
    history: list[Turn],
    chat: ChatSettings,
    should_stop: Callable[[], bool] | None = None,
) -> Answer:
    """An answer for a person (chat page, API, `ask`), timed for /metrics as they wait for it:
    from here, so retrieval, loading the model and waiting for it count too."""
    started = time.perf_counter()
    answer = answer_from(
        gguf=version.gguf_file,
        index=index_for(version),
        question=question,
        history=history,
        chat=chat,
        should_stop=should_stop,
    )
    answer.pieces = answer_observed(answer.pieces, answer.result, started=started)  # type: ignore[arg-type]
    return answer


def answer_from(
    *,
    gguf: Path,
    index: HybridIndex | None,
    question: str,
    history: list[Turn],
    chat: ChatSettings,
    should_stop: Callable[[], bool] | None = None,
) -> Answer:
    """Retrieve → prompt → stream, for any GGUF and index: a model version's (chat, API, CLI),
    or a model a build has just made and is evaluating."""
    hits = (
        index.search(question, k=chat.top_k)
        if index is not None and chat.top_k > 0 and question.strip()
        else []
    )
    sources = sources_from_hits(hits)
    passages = [Passage(s["n"], s["title"], s["location"], s["text"]) for s in sources]
    engine = engines.get(gguf, n_ctx=N_CTX)
    messages = build_messages(
        question,
        passages,
        history,
        count_tokens=engine.count_chat_tokens,
        n_ctx=engine.n_ctx,
        max_new_tokens=chat.max_tokens,
    )
    result = GenerationResult()
    config = GenerationConfig(max_tokens=chat.max_tokens, temperature=chat.temperature)
    pieces = engine.stream_chat(messages, config, should_stop=should_stop, result=result)
    guard = AnswerGuard(policy_for(question=question, passages=source_texts(sources)))
    return Answer(sources=sources, pieces=_guarded(pieces, guard, result), result=result)


def _guarded(pieces: Iterator[str], guard: AnswerGuard, result: GenerationResult) -> Iterator[str]:
    """The answer as it may be shown (engines/guard.py: links to unknown hosts and the system
    prompt removed); once it ends or is closed, `result.text` is that text too."""
    try:
        yield from guarded(pieces, guard)
    finally:
        result.text = guard.text


def usage_of(result: GenerationResult) -> dict[str, float | int | str | None]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "first_token_seconds": round(result.first_token_seconds, 3) if result.first_token_seconds else None,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
    }


# --- Conversations -------------------------------------------------------------------------


def conversation_start(*, version: ModelVersion, user: AbstractBaseUser, first_question: str) -> Conversation:
    title = " ".join(first_question.split())[:80] or "New conversation"
    return Conversation.objects.create(version=version, user=user, title=title)


def message_ask(*, conversation: Conversation, question: str, chat: ChatSettings) -> Message:
    conversation.save(update_fields=["updated_at"])
    return Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content=question.strip(), settings=chat.as_dict()
    )


def _history(conversation: Conversation, before: Message) -> list[Turn]:
    return [
        Turn(m.role, m.content) for m in conversation.messages.filter(id__lt=before.id).exclude(content="")
    ]


def answer_stream(
    *, question: Message, should_stop: Callable[[], bool] | None = None
) -> Iterator[tuple[str, object]]:
    """Events for the chat page: ("token", text)… then ("done", answer Message).

    The answer is saved however the stream ends — finished, or cut short when the browser goes
    away (the WSGI server then closes this generator) — so the conversation never loses a turn.
    One stopped (should_stop(): the browser left) before the model wrote anything saves nothing:
    the question stays unanswered, and the page answers it when it is opened again.
    """
    conversation = question.conversation
    chat = ChatSettings.clamped(**question.settings)
    answer = answer_start(
        version=conversation.version,
        question=question.content,
        history=_history(conversation, question),
        chat=chat,
        should_stop=should_stop,
    )
    reply = None
    try:
        for piece in answer.pieces:
            yield "token", piece
    finally:
        answer.pieces.close()  # type: ignore[attr-defined]
        if answer.result.completion_tokens or answer.result.finish_reason != "cancelled":
            reply = Message.objects.create(
                conversation=conversation,
                role=Message.Role.ASSISTANT,
                content=answer.result.text,
                sources=answer.sources,
                usage=usage_of(answer.result),
                reply_to=question,
            )
    if reply is not None:
        yield "done", reply


def message_html(message: Message) -> str:
    # Answers are filtered as they are generated; filtering again covers answers saved before.
    question = message.reply_to.content if message.reply_to_id else ""  # type: ignore[union-attr]
    policy = policy_for(question=question, passages=source_texts(message.sources))
    return render_answer(guard_text(message.content, policy), source_count=len(message.sources))


# --- API tokens ----------------------------------------------------------------------------


def api_token_create(*, user: AbstractBaseUser, name: str) -> tuple[ApiToken, str]:
    """Create a token; the raw value is returned once and never stored."""
    raw = "slm_" + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name.strip()[:80] or "API token", prefix=raw[:10], token_hash=ApiToken.hash(raw)
    )
    return token, raw


def api_token_user(*, raw: str) -> AbstractBaseUser | None:
    token = ApiToken.objects.select_related("user").filter(token_hash=ApiToken.hash(raw)).first()
    if token is None or not token.user.is_active:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user


def project_versions(*, project: Project) -> QuerySet[ModelVersion]:
    return project.model_versions.select_related("build", "base", "project")
