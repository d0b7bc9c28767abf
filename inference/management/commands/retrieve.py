from __future__ import annotations

import json
from pathlib import Path

from inference import services
from slmstudio.lib.cli import JsonCommand
from training.models import ModelVersion


class Command(JsonCommand):
    help = (
        'Retrieve passages for each {"query": ...} line of a JSONL file; prints one line per query: '
        '{"query": ..., "results": [{"document": ..., "text": ..., "score": ...}]}. The index is loaded once.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("version", type=int, help="model version id")
        parser.add_argument("--queries", type=Path, required=True, help='JSONL file of {"query": ...}')
        parser.add_argument("--k", type=int, default=5)
        parser.add_argument("--mode", choices=["hybrid", "dense", "lexical"], default="hybrid")

    def handle(self, *args, version: int, queries: Path, k: int, mode: str, **options) -> None:  # type: ignore[no-untyped-def]
        target = ModelVersion.objects.select_related("project").filter(pk=version).first()
        if target is None:
            self.fail(f"No model version {version}.")
        if target.index_path is None:
            self.fail(f"Model version {version} has no document index.")
        try:
            lines = queries.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(f"Cannot read {queries}: {exc}")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                query = json.loads(line)["query"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.fail(f'Line {number} is not a JSON object with a "query".')
            hits = services.retrieve(version=target, query=str(query), k=k, mode=mode)
            self.emit(
                {
                    "query": query,
                    "results": [
                        {
                            "document": h.chunk.document_title,
                            "document_id": h.chunk.document_id,
                            "text": h.chunk.text,
                            "score": round(h.score, 6),
                        }
                        for h in hits
                    ],
                }
            )
