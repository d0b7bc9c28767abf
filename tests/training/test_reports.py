"""The data quality report on a small real project: the service, the task's debounce, the CLI,
the page and the wizard reading its advice. One module-scoped report keeps the embedding model's
load (about 6 s) to one."""

from __future__ import annotations

import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects import quality
from projects.models import DataReport, InstructionPair
from projects.services import data_changed, document_add, document_parse, pair_create
from training import reports, wizard
from training.ml.advisor import MIN_PAIRS_FOR_TRAINING

pytestmark = pytest.mark.django_db

PUMP = (
    "# P-200 pump manual\n\n## Resetting the pump\n\nTo reset the P-200 pump, hold the red RESET button "
    "for five seconds until the status LED blinks green. Then release it and wait ten seconds.\n\n"
    "## Error codes\n\nError E-4021 means the inlet pressure is too low: open the inlet valve fully.\n"
)
VACATION = (
    "# Vacation policy\n\nEmployees get 25 days of paid vacation per year. Requests go to your manager "
    "at least two weeks ahead. Unused days expire at the end of March.\n"
)
GARBLED = "# Scan\n\n" + "(cid:12)(cid:34) \ufffd\ufffd pump (cid:56)(cid:78) reset \ufffd " * 6 + "\n"


def _doc(project, name: str, text: str) -> None:
    added = document_add(
        project=project, stream=SimpleUploadedFile(name, text.encode()), name=name, size=None
    )
    document_parse(document_id=added.document.pk)


def _pair(project, q: str, a: str, split: str) -> InstructionPair:
    pair = pair_create(project=project, instruction=q, input="", response=a)
    InstructionPair.objects.filter(pk=pair.pk).update(split=split)
    return pair


@pytest.fixture
def data_project(project):  # type: ignore[no-untyped-def]
    _doc(project, "pump.md", PUMP)
    _doc(project, "vacation.md", VACATION)
    _doc(project, "scan.md", GARBLED)
    train, ev = InstructionPair.Split.TRAIN, InstructionPair.Split.EVAL
    _pair(
        project,
        "How do I reset the P-200 pump?",
        "Hold the red RESET button for five seconds until the LED blinks green.",
        train,
    )
    _pair(
        project, "What does E-4021 mean?", "The inlet pressure is too low: open the inlet valve fully.", train
    )
    _pair(project, "How many vacation days do I get?", "You get 25 days of paid vacation per year.", train)
    _pair(project, "Who founded the company?", "It was founded in 1987 in Rotterdam by two brothers.", train)
    _pair(project, "How do I reset the P-200 pump ?", "Press and hold RESET for five seconds.", ev)  # leaks
    return project


def test_report_service_cli_page_and_wizard(data_project, owner_client, django_capture_on_commit_callbacks):
    project = data_project
    report = reports.report_refresh(project_id=project.pk)
    assert report is not None
    data = report.data
    docs, pairs = data["documents"], data["pairs"]
    assert docs["count"] == 3 and docs["languages"]["en"] >= 2
    assert [d["name"] for d in docs["garbled"]["documents"]] == ["Scan"]
    assert pairs["train"] == 4 and pairs["eval"] == 1
    # The founding answer is in no document; the others are.
    support = pairs["support"]
    assert support["threshold"] == quality.SUPPORT_THRESHOLD and support["scored"] == 5
    assert [e["question"] for e in support["examples"]] == ["Who founded the company?"]
    assert pairs["leakage"]["count"] == 1 and pairs["leakage"]["examples"][0]["similarity"] == 1.0
    topics = {t["topic"]: t["pairs"] for t in pairs["topics"]["topics"]}
    assert topics == {"P-200 pump manual": 3, "Vacation policy": 1} and pairs["topics"]["without_topic"] == 1
    codes = quality.advice_codes(data)
    assert {"few_pairs", "leakage", "garbled_text"} <= codes and "no_eval_pairs" not in codes

    # Debounce: current, so the task does nothing; a change makes it compute again.
    assert reports.report_is_current(project=project)
    assert reports.report_refresh(project_id=project.pk) is None
    with django_capture_on_commit_callbacks(execute=True):
        data_changed(project=project)  # sends the (eager) task on commit
    refreshed = DataReport.objects.get(project=project)
    assert refreshed.computed_at > report.computed_at
    project.refresh_from_db()
    assert reports.report_is_current(project=project)

    # The CLI twin prints the stored numbers (and computes them without --cached).
    out = io.StringIO()
    call_command("datareport", project.slug, "--cached", stdout=out)
    printed = json.loads(out.getvalue())
    assert printed["pairs"]["leakage"]["count"] == 1 and printed["current"] is True
    assert set(printed) >= {"version", "documents", "pairs", "privacy", "advice", "computed_at", "seconds"}

    # The page shows the advice first; the wizard shows it with its recommendation.
    page = owner_client.get(reverse("training-data-report", args=[project.slug]))
    assert page.status_code == 200
    body = page.content.decode()
    assert "Only 4 training pairs: LoRA will overfit" in body and "Who founded the company?" in body
    result = wizard.recommend_for(project, {})
    assert "few_pairs" in {a["code"] for a in result["advice"]}
    assert not {"lora", "raft"} & set(result["recipe"])


def test_cli_computes_and_fails_readably(project):
    out = io.StringIO()
    call_command("datareport", str(project.pk), stdout=out)  # by id; no data: no model loaded
    printed = json.loads(out.getvalue())
    assert printed["documents"]["count"] == 0 and [a["code"] for a in printed["advice"]] == ["no_data"]
    with pytest.raises(SystemExit):
        call_command("datareport", "no-such-project", stdout=io.StringIO())


def test_data_changes_mark_the_report_out_of_date(project):
    assert project.data_changed_at is None
    pair = pair_create(project=project, instruction="Q?", input="", response="A.")
    project.refresh_from_db()
    first = project.data_changed_at
    assert first is not None
    DataReport.objects.create(project=project, data={}, computed_at=first)
    assert reports.report_is_current(project=project)
    from projects.services import pair_delete

    pair_delete(pair=pair)
    project.refresh_from_db()
    assert project.data_changed_at > first and not reports.report_is_current(project=project)


def test_page_states_and_recompute(project, owner_client, outsider_client):
    url = reverse("training-data-report", args=[project.slug])
    assert outsider_client.get(url).status_code == 404
    empty = owner_client.get(url).content.decode()
    assert "Compute the report" in empty
    response = owner_client.post(reverse("training-data-report-recompute", args=[project.slug]))
    assert response.status_code == 302
    project.refresh_from_db()
    assert project.data_changed_at is not None
    computing = owner_client.get(url, HTTP_HX_REQUEST="true")
    assert computing.status_code == 200 and "being computed" in computing.content.decode()
    assert 'hx-trigger="every 3s"' in computing.content.decode()


def test_wizard_counts_distinct_pairs_from_the_report(project):
    for i in range(MIN_PAIRS_FOR_TRAINING + 5):
        pair_create(project=project, instruction=f"Question number {i}?", input="", response=f"Answer {i}.")
    InstructionPair.objects.filter(project=project).update(split=InstructionPair.Split.TRAIN)
    assert "lora" in wizard.recommend_for(project, {"priority": "speed"})["recipe"]
    DataReport.objects.create(
        project=project, computed_at=project.created_at,
        data={"pairs": {"duplicates": 10, "near_duplicates": 5}, "advice": []},
    )  # fmt: skip
    result = wizard.recommend_for(project, {"priority": "speed"})
    assert "lora" not in result["recipe"] and "repeat others" in result["why"][0]


def test_thresholds_agree_with_the_wizard():
    assert quality.PAIRS_FOR_TRAINING == MIN_PAIRS_FOR_TRAINING
