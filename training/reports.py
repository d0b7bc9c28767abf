"""The dataset quality report of a project (issue 11): gathers its documents and pairs, scores
each answer against the document passages with the embedding model, stores the numbers as the
project's DataReport and derives the plain-language advice (projects.quality) the wizard reads.

Extraction quality is measured on the text as parsed (what the file gave us); support, topics
and passage duplicates on the text models read (with the project's redaction applied).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from projects import privacy, quality
from projects.models import DataReport, Document, InstructionPair, Project
from projects.services import document_parsed

REPORT_VERSION = 1
EXAMPLES = 10  # how many of each kind of problem the report lists (the counts are complete)


def report_is_current(*, project: Project, report: DataReport | None = None) -> bool:
    """Whether the stored report was computed after the project's data last changed."""
    if report is None:
        report = DataReport.objects.filter(project=project).first()
    if report is None:
        return False
    return project.data_changed_at is None or report.computed_at >= project.data_changed_at


def _documents_section(project: Project) -> tuple[dict[str, Any], list[Document]]:
    documents = list(project.documents.order_by("pk"))
    parsed_docs = []
    sizes, pages_total, near_empty_total = [], 0, 0
    mostly_empty, garbled_docs, languages = [], [], {}
    garbled_chars = visible = 0
    raw_passages: list[tuple[Document, str]] = []
    for document in documents:
        if document.status != Document.Status.PARSED:
            continue
        parsed = document_parsed(document=document)
        if parsed is None:
            continue
        parsed_docs.append(document)
        text = "\n\n".join(s.text for s in parsed.sections)
        sizes.append(len(text))
        # Pages for files that have them (PDF), else sections; a PDF page with no section at all
        # (nothing extracted) counts as empty too.
        if document.page_count:
            by_page: dict[int, list[str]] = {p: [] for p in range(1, document.page_count + 1)}
            for section in parsed.sections:
                by_page.setdefault(section.page or 1, []).append(section.text)
            units = ["\n".join(texts) for texts in by_page.values()]
        else:
            units = [s.text for s in parsed.sections] or [""]
        empty = quality.near_empty(units)
        pages_total += len(units)
        near_empty_total += len(empty)
        name = document.title or document.original_name
        if (
            units
            and len(empty) / len(units) >= quality.EMPTY_PAGES_SHARE
            and (document.page_count or not text.strip())
        ):
            mostly_empty.append({"id": document.pk, "name": name, "empty": len(empty), "of": len(units)})
        bad = quality.garbled_chars(text)
        seen = quality.visible_chars(text)
        garbled_chars, visible = garbled_chars + bad, visible + seen
        ratio = bad / seen if seen else 0.0
        if ratio >= quality.GARBLED_WARN:
            garbled_docs.append({"id": document.pk, "name": name, "ratio": round(ratio, 4)})
        lang, _confidence = quality.language(text)
        languages[lang or "unknown"] = languages.get(lang or "unknown", 0) + 1
        for section in parsed.sections:
            for paragraph in section.text.split("\n\n"):
                if quality.visible_chars(paragraph) >= quality.NEAR_EMPTY_CHARS:
                    raw_passages.append((document, paragraph))
    # Duplicated passages: paragraphs of the parsed text (boilerplate repeats paragraph by
    # paragraph), compared with MinHash; exact copies are near-duplicates with similarity 1.
    groups = quality.near_duplicate_groups([text for _, text in raw_passages])
    section = {
        "count": len(parsed_docs),
        "failed": sum(d.status == Document.Status.FAILED for d in documents),
        "pending": sum(d.status in (Document.Status.PENDING, Document.Status.PARSING) for d in documents),
        "chars": quality.distribution(sizes),
        "pages": pages_total,
        "near_empty_pages": near_empty_total,
        "mostly_empty": mostly_empty,
        "garbled": {
            "ratio": round(garbled_chars / visible, 4) if visible else 0.0,
            "documents": sorted(garbled_docs, key=lambda d: -d["ratio"]),
        },
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "passages": len(raw_passages),
        "duplicates": {
            "groups": len(groups),
            "redundant": quality.redundant(groups),
            "examples": [
                [
                    {
                        "document": raw_passages[i][0].pk,
                        "name": raw_passages[i][0].title or raw_passages[i][0].original_name,
                        "text": raw_passages[i][1][:160],
                    }
                    for i in group[:5]
                ]
                for group in groups[:EXAMPLES]
            ],
        },  # fmt: skip
    }
    return section, parsed_docs


def _support(
    project: Project, documents: list[Document], pairs: list[privacy.PairText]
) -> tuple[list[float | None], list[str | None]]:
    """Each pair's best cosine between its answer and a document passage (the passages a RAG
    build would index, as models read them), and the title of the document of that passage."""
    if not pairs or not documents:
        return [None] * len(pairs), [None] * len(pairs)
    from .embedding import shared_embedder
    from .ml import rag

    redactor = privacy.Redactor(project)
    chunks: list[rag.Chunk] = []
    for document in documents:
        parsed = privacy.document_for_models(document=document, redactor=redactor)
        if parsed is not None:
            chunks += rag.chunk_document(document.pk, parsed.title or document.original_name, parsed.sections)
    if not chunks:
        return [None] * len(pairs), [None] * len(pairs)
    from .ml.embcache import EmbeddingCache

    embedder = shared_embedder()
    # Passage vectors through the project's embedding cache (the folder the RAG step uses), so
    # the report and the next RAG build embed each passage once.
    cache = EmbeddingCache(project.data_dir / "embeddings", embedder)
    passages = cache.embed([c.embedding_text() for c in chunks])
    answers = cache.embed([p.response for p in pairs])  # unchanged pairs are not embedded again
    best_scores: list[float | None] = []
    topics: list[str | None] = []
    for start in range(0, len(pairs), 256):  # bounded memory: 256 x passages floats at a time
        sims = answers[start : start + 256] @ passages.T
        best = np.argmax(sims, axis=1)
        for row, column in enumerate(best):
            score = float(sims[row, column])
            best_scores.append(round(score, 3))
            topics.append(chunks[column].document_title if score >= quality.SUPPORT_THRESHOLD else None)
    return best_scores, topics


def _preview(text: str, size: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= size else text[: size - 1] + "…"


def _pairs_section(project: Project, documents: list[Document]) -> dict[str, Any]:
    pairs = privacy.pairs_for_models(project=project)
    train = [p for p in pairs if p.split == InstructionPair.Split.TRAIN]
    eval_ = [p for p in pairs if p.split == InstructionPair.Split.EVAL]
    questions = [p.question for p in pairs]
    duplicate_questions = quality.duplicate_groups(questions)
    whole = [f"{p.question}\n\n{p.response}" for p in pairs]
    exact = quality.duplicate_groups(whole)
    near = quality.near_duplicate_groups(whole)
    leaks = quality.leakage([p.question for p in train], [p.question for p in eval_])
    scores, topics = _support(project, documents, pairs)
    scored = [s for s in scores if s is not None]
    unsupported = sorted(
        (i for i, s in enumerate(scores) if s is not None and s < quality.SUPPORT_THRESHOLD),
        key=lambda i: scores[i],
    )
    return {
        "count": len(pairs),
        "train": len(train),
        "eval": len(eval_),
        "pending_review": project.pairs.filter(review=InstructionPair.Review.PENDING).count(),
        "rejected": project.pairs.filter(review=InstructionPair.Review.REJECTED).count(),
        "question_words": quality.distribution([quality.words(p.question) for p in pairs]),
        "answer_words": quality.distribution([quality.words(p.response) for p in pairs]),
        "duplicates": quality.redundant(exact),
        "duplicate_questions": quality.redundant(duplicate_questions),
        "near_duplicates": quality.redundant(near) - quality.redundant(exact),
        "duplicate_examples": [[pairs[i].pk for i in group] for group in near[:EXAMPLES]],
        "support": {
            "threshold": quality.SUPPORT_THRESHOLD,
            "scored": len(scored),
            "unsupported": len(unsupported),
            "median": round(float(np.median(scored)), 3) if scored else None,
            "examples": [
                {"pair": pairs[i].pk, "score": scores[i], "question": _preview(pairs[i].question)}
                for i in unsupported[:EXAMPLES]
            ],
        },
        "leakage": {
            "count": len(leaks),
            "examples": [
                {
                    "eval": eval_[m.a].pk,
                    "train": train[m.b].pk,
                    "similarity": m.similarity,
                    "question": _preview(eval_[m.a].question),
                }
                for m in leaks[:EXAMPLES]
            ],
        },  # fmt: skip
        "topics": {"by": "document of the best-supporting passage"} | quality.topic_balance(topics),
    }


def report_compute(*, project: Project) -> DataReport:
    """Compute the report now and store it (replacing the previous one)."""
    started = timezone.now()
    clock = time.monotonic()
    documents_part, documents = _documents_section(project)
    summary = privacy.findings_summary(project=project)
    data: dict[str, Any] = {
        "version": REPORT_VERSION,
        "documents": documents_part,
        "pairs": _pairs_section(project, documents),
        "privacy": {"findings": summary["findings"], "unredacted": summary["unredacted"]},
    }
    data["advice"] = quality.advice(data)
    seconds = round(time.monotonic() - clock, 2)
    data["computed_at"] = started.isoformat()
    data["seconds"] = seconds
    with transaction.atomic():
        # computed_at is when reading began: data changed while we read leaves it out of date.
        report, _ = DataReport.objects.update_or_create(
            project=project, defaults={"data": data, "computed_at": started, "seconds": seconds}
        )
    return report


def report_refresh(*, project_id: int, force: bool = False) -> DataReport | None:
    """The task's work: scan for personal data (so findings are current), then recompute, unless
    the stored report is already newer than the last data change (several uploads in a row send
    several messages; the first computes, the rest find it current). None when skipped."""
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return None
    if not force and report_is_current(project=project):
        return None
    privacy.project_scan(project=project)
    return report_compute(project=project)


def report_request(*, project: Project) -> None:
    """ "Recompute" pressed: mark the report out of date now and send the task once committed."""
    from projects.services import data_changed

    data_changed(project=project)


def report_age_minutes(computed_at: datetime) -> int:
    return max(0, int((timezone.now() - computed_at).total_seconds() // 60))


def wizard_advice(*, project: Project) -> list[dict[str, str]]:
    """The advice the wizard shows with its recommendation (empty without a report)."""
    report = DataReport.objects.filter(project=project).first()
    return list((report.data or {}).get("advice") or []) if report else []
