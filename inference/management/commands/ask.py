from __future__ import annotations

from inference import services
from slmstudio.lib.cli import JsonCommand
from training.models import ModelVersion


class Command(JsonCommand):
    help = (
        'Ask a model version a question; prints {"answer": ..., "sources": [...], "tokens_per_second": ...}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("version", type=int, help="model version id")
        parser.add_argument("question")
        parser.add_argument("--top-k", type=int, default=services.ChatSettings.top_k)
        parser.add_argument("--temperature", type=float, default=services.ChatSettings.temperature)
        parser.add_argument("--max-tokens", type=int, default=services.ChatSettings.max_tokens)

    def handle(
        self, *args, version: int, question: str, top_k: int, temperature: float, max_tokens: int, **options
    ) -> None:  # type: ignore[no-untyped-def]
        target = ModelVersion.objects.select_related("project").filter(pk=version).first()
        if target is None:
            self.fail(f"No model version {version}.")
        if not question.strip():
            self.fail("The question is empty.")
        chat = services.ChatSettings.clamped(top_k=top_k, temperature=temperature, max_tokens=max_tokens)
        answer = services.answer_start(version=target, question=question, history=[], chat=chat)
        result = answer.complete()
        self.emit(
            {
                "answer": result.text,
                "sources": answer.sources,
                "tokens_per_second": round(result.tokens_per_second, 1),
                "usage": services.usage_of(result),
            }
        )
