"""Retrieval isolation (issue 9): one project's questions never get another project's passages,
and another project's model version is refused (404) wherever a version is named.

Two projects, each with a version built by the real RAG step (the bundled MiniLM embeddings), are
asked each other's unique terms through every way passages leave the app: the retrieval-only
view, the chat's sources, the /v1 API (stream and not), and the CLI's `retrieve` and `ask`.
"""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from inference import services
from inference.models import Conversation, Message
from projects.models import Project
from projects.services import documents_ingest_paths, project_create
from tests.conftest import client_for
from tests.projects.test_access import _project_urls
from training.models import Build, ModelVersion
from training.services import build_run, build_start

pytestmark = pytest.mark.django_db

PUMPS = {
    "pump.md": (
        "# Zephyrine pump manual\n\n## Resetting the pump\n\nTo reset the Zephyrine pump, close the "
        "Zephyrine valve and hold the red RESET button for five seconds.\n\n## Error codes\n\n"
        "Error Z-4021 means the Zephyrine inlet pressure is too low: open the valve fully.\n"
    ),
    "seals.md": "# Seal inspection\n\nInspect the Zephyrine seals every spring; replace cracked seals.\n",
}
PAYROLL = {
    "payroll.md": (
        "# Quillback payroll handbook\n\n## Cutoff\n\nThe Quillback ledger closes on the 20th of each "
        "month: expenses filed after the Quillback cutoff are paid the month after.\n\n## Bonuses\n\n"
        "Quillback bonuses are paid in March.\n"
    ),
    "travel.md": "# Quillback travel policy\n\nBook Quillback travel two weeks ahead; economy class only.\n",
}
# Each project's own word, in its every passage, and never in the other's.
MARK = {"pumps": "zephyrine", "payroll": "quillback"}
QUESTION = {
    "pumps": "Quillback ledger cutoff: when are Quillback bonuses and travel paid?",
    "payroll": "Zephyrine valve: how do I reset the Zephyrine pump, and what is error Z-4021?",
}
TOKENS = 16  # sources are the point here, not the answer


def _rag_version(project: Project, user: User, folder: Path, docs: dict[str, str]) -> ModelVersion:
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    result = documents_ingest_paths(project=project, paths=[folder], user=user)
    assert (result.added, result.failed) == (len(docs), [])
    # Parse and index only: the evaluate step's speed measurement is not what this is about.
    build = build_start(project=project, user=user, recipe="rag", steps=[{"name": "parse"}, {"name": "rag"}])
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    return ModelVersion.objects.get(build=build)


def _check_sources(sources: list[dict], project: Project, other: str, where: str) -> None:
    own = set(project.documents.values_list("pk", flat=True))
    assert sources, f"{where}: no passage at all, so nothing was checked"
    for source in sources:
        assert source["document_id"] in own, (where, source)
        assert other not in source["text"].casefold(), (where, source)
        assert other not in source["title"].casefold(), (where, source)


def _cli(*args: str) -> list[dict]:
    out = StringIO()
    call_command(*args, stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _sse(response) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    events = []
    for block in b"".join(response.streaming_content).decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_no_path_returns_another_projects_passages(owner, outsider, tmp_path):
    pumps = project_create(name="Pump handbook", owner=owner)
    payroll = project_create(name="Payroll office", owner=outsider)
    built = {
        "pumps": (pumps, _rag_version(pumps, owner, tmp_path / "pumps", PUMPS), owner),
        "payroll": (payroll, _rag_version(payroll, outsider, tmp_path / "payroll", PAYROLL), outsider),
    }
    for name, (project, version, user) in built.items():
        other = MARK["payroll" if name == "pumps" else "pumps"]
        question = QUESTION[name]  # the other project's unique words
        client = client_for(user)
        own_prefix = f"/p/{project.slug}/documents/"

        # Retrieval itself, every mode, asking for more passages than the index holds.
        for mode in ("hybrid", "dense", "lexical"):
            hits = services.retrieve(version=version, query=question, k=50, mode=mode)
            if mode != "lexical":  # lexical only finds shared words, and there are none
                _check_sources(services.sources_from_hits(hits), project, other, f"{name} {mode}")
            assert not any(other in h.chunk.text.casefold() for h in hits)
        assert services.retrieve(version=version, query=f"{other} {other}", k=50, mode="lexical") == []

        # The retrieval-only view: its passages and their document links.
        url = reverse("inference-retrieve", args=[project.slug, version.number])
        page = client.get(url, {"question": question, "top_k": 10}).content.decode()
        passages = re.findall(r'<blockquote class="passage">(.*?)</blockquote>', page, re.S)
        links = re.findall(r'href="(/p/[^"]*/documents/[^"]*)"', page)
        assert passages and links, page
        assert not any(other in p.casefold() for p in passages)
        assert all(link.startswith(own_prefix) for link in links), links
        own_ids = {str(pk) for pk in project.documents.values_list("pk", flat=True)}
        assert {link[len(own_prefix) :].split("/")[0] for link in links} <= own_ids

        # The chat page: the answer's sources, saved and shown.
        asked = client.post(
            reverse("inference-ask", args=[project.slug, version.number]),
            {"question": question, "top_k": 10, "max_tokens": TOKENS, "temperature": 0},
            HTTP_X_CHAT="1",
        ).json()
        events = _sse(client.get(asked["stream_url"]))
        reply = Message.objects.get(reply_to__conversation_id=asked["conversation"])
        _check_sources(reply.sources, project, other, f"{name} chat")
        done = events[-1][1]["html"]  # type: ignore[index]
        assert all(
            link.startswith(own_prefix) for link in re.findall(r'href="(/p/[^"]*/documents/[^"]*)"', done)
        )

        # The /v1 API, without and with streaming (same prompt: the model's cache answers fast).
        _, raw = services.api_token_create(user=user, name="t")
        api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
        body = {
            "model": version.api_id, "messages": [{"role": "user", "content": question}],
            "top_k": 10, "max_tokens": TOKENS, "temperature": 0,
        }  # fmt: skip
        data = api.post("/v1/chat/completions", json.dumps(body), content_type="application/json").json()
        _check_sources(data["sources"], project, other, f"{name} api")
        streamed = api.post(
            "/v1/chat/completions", json.dumps(body | {"stream": True}), content_type="application/json"
        )
        first = json.loads(b"".join(streamed.streaming_content).decode().split("\n\n")[0][len("data: ") :])
        _check_sources(first["sources"], project, other, f"{name} api stream")

        # The CLI twins.
        queries = tmp_path / f"{name}-queries.jsonl"
        queries.write_text(json.dumps({"query": question}) + "\n" + json.dumps({"query": other}) + "\n")
        for mode in ("hybrid", "dense"):
            for line in _cli(
                "retrieve", str(version.pk), "--queries", str(queries), "--k", "50", "--mode", mode
            ):
                _check_sources(
                    [r | {"title": r["document"]} for r in line["results"]],
                    project,
                    other,
                    f"{name} cli {mode}",
                )
        asked_cli = _cli(
            "ask",
            str(version.pk),
            question,
            "--top-k",
            "10",
            "--max-tokens",
            str(TOKENS),
            "--temperature",
            "0",
        )[0]
        _check_sources(asked_cli["sources"], project, other, f"{name} cli ask")


# --- Another project's version is refused wherever a version is named ------------------------


@pytest.fixture
def two_projects(owner, outsider):  # type: ignore[no-untyped-def]
    """Alice's project with v1; Charlie's with v1 and v2 and a conversation. No model is loaded:
    every refusal must come before one would be."""
    mine = project_create(name="Pump handbook", owner=owner)
    theirs = project_create(name="Payroll office", owner=outsider)
    fields = {"recipe": "rag", "base_model": "x", "gguf_path": "/nonexistent.gguf"}
    ModelVersion.objects.create(project=mine, number=1, **fields)
    for number in (1, 2):
        ModelVersion.objects.create(project=theirs, number=number, **fields)
    conversation = Conversation.objects.create(
        version=theirs.model_versions.get(number=1), user=outsider, title="Q"
    )
    question = Message.objects.create(conversation=conversation, role="user", content="Q?")
    return mine, theirs, {"conversation": conversation.pk, "message": question.pk}


def _version_routes() -> list[tuple[str, list[str]]]:
    routes = [(name, args) for name, args in _project_urls() if "number" in args]
    assert {n for n, _ in routes} >= {
        "inference-chat",
        "inference-ask",
        "inference-stream",
        "inference-retrieve",
    }
    return routes


def _refused(client: Client, url: str, data: dict | None = None) -> int:
    response = client.get(url)
    if response.status_code == 405:  # a POST-only action
        response = client.post(url, data or {"question": "Q?"})
    return response.status_code


def test_another_projects_version_is_404_in_every_url(owner, two_projects):
    mine, theirs, ids = two_projects
    alice = client_for(owner)
    for name, args in _version_routes():

        def url(project: Project, number: int, name: str = name, args: list[str] = args) -> str:
            values = {"number": number} | ids
            return reverse(name, args=[project.slug, *(values[a] for a in args)])

        # Their project by its own slug, their v2 under my slug, their conversation under my v1.
        assert _refused(alice, url(theirs, 1)) == 404, name
        assert _refused(alice, url(mine, 2)) == 404, name
        if {"conversation", "message"} & set(args):
            assert _refused(alice, url(mine, 1)) == 404, name
    # Continuing their conversation from my version is refused too.
    ask = reverse("inference-ask", args=[mine.slug, 1])
    assert alice.post(ask, {"question": "Q?", "conversation": ids["conversation"]}).status_code == 404
    assert not Message.objects.filter(conversation__version__project=mine).exists()


@pytest.mark.parametrize("stream", [False, True])
def test_another_projects_version_is_404_in_the_api(owner, two_projects, stream):
    mine, theirs, _ = two_projects
    _, raw = services.api_token_create(user=owner, name="t")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    listed = [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert listed == [f"{mine.slug}/v1"]
    for model in (f"{theirs.slug}/v1", f"{theirs.slug}/v2", f"{mine.slug}/v2", f"{theirs.slug}/v01"):
        body = {"model": model, "messages": [{"role": "user", "content": "Q?"}], "stream": stream}
        response = api.post("/v1/chat/completions", json.dumps(body), content_type="application/json")
        assert response.status_code == 404, model
        assert response.json()["error"]["code"] == "model_not_found"
