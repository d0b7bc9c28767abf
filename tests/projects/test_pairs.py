from __future__ import annotations

import json

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from projects.models import InstructionPair
from projects.pairformats import read_pairs, split_for
from projects.services import pair_create, pair_update, pairs_import

pytestmark = pytest.mark.django_db


def _jsonl(rows: list[object]) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


GOOD = [
    {"instruction": f"How do I reset pump {i}?", "response": f"Hold button {i} for five seconds."}
    for i in range(30)
]


def test_it_imports_valid_rows_and_reports_rejected_lines(project):
    data = _jsonl(
        [
            *GOOD[:3],
            {"instruction": "No answer here"},
            {"instruction": "  ", "response": "x"},
            GOOD[0],
            "{not json",
            {"instruction": "Long", "response": "y" * 20_001},
        ]
    )
    report = pairs_import(project=project, data=data, filename="pairs.jsonl")
    assert report.added == 3
    assert [(r.line, r.error) for r in report.rejected] == [
        (4, "missing field 'response'"),
        (5, "empty instruction"),
        (6, "duplicate of line 1"),
        (7, report.rejected[3].error),
        (8, "response is 20,001 characters; the limit is 20,000"),
    ]
    assert report.rejected[3].error.startswith("not valid JSON")
    assert project.pairs.count() == 3
    assert report.train + report.eval == 3


def test_a_file_that_cannot_be_read_imports_nothing(project):
    report = pairs_import(
        project=project, data="instruction,response\nä,ö\n".encode("latin-1"), filename="p.csv"
    )
    assert report.file_error and "UTF-8" in report.file_error
    assert report.added == 0 and not project.pairs.exists()


def test_reimporting_the_same_file_adds_nothing(project):
    data = _jsonl(GOOD)
    assert pairs_import(project=project, data=data, filename="p.jsonl").added == 30
    again = pairs_import(project=project, data=data, filename="p.jsonl")
    assert again.added == 0
    assert {r.error for r in again.rejected} == {"duplicate of a pair already in the project"}


def test_the_split_is_stable_and_about_ten_percent(project):
    rows = [{"instruction": f"Question number {i}", "response": f"Answer {i}"} for i in range(400)]
    pairs_import(project=project, data=_jsonl(rows), filename="p.jsonl")
    for pair in project.pairs.all():
        assert pair.split == split_for(pair.key, 0.1)
    share = project.pairs.filter(split="eval").count() / 400
    assert 0.05 <= share <= 0.15


def test_editing_a_pair_keeps_its_split(project):
    pairs_import(project=project, data=_jsonl(GOOD), filename="p.jsonl")
    for pair in project.pairs.all():
        before = pair.split
        pair_update(pair=pair, instruction=pair.instruction + " now", input="", response=pair.response)
        pair.refresh_from_db()
        assert pair.split == before
        assert pair.instruction.endswith(" now")


def test_adding_a_duplicate_by_hand_is_refused(project):
    pair_create(project=project, instruction="What is X?", input="", response="X is Y.")
    with pytest.raises(ValidationError):
        pair_create(project=project, instruction="  what is x? ", input="", response="X is  Y.")


def test_export_round_trips_through_import(project):
    pairs_import(project=project, data=_jsonl(GOOD), filename="p.jsonl")
    pair_create(project=project, instruction="With context", input="Some context", response="Answer")
    from projects.services import pairs_export_jsonl

    exported = pairs_export_jsonl(project=project).encode()
    parsed = read_pairs(exported, "export.jsonl")
    assert not parsed.rejected and len(parsed.pairs) == 31
    assert {p.key() for p in parsed.pairs} == set(project.pairs.values_list("key", flat=True))


def test_the_import_page_shows_the_report(owner_client, project):
    data = _jsonl([GOOD[0], {"prompt": "x"}])
    response = owner_client.post(
        reverse("projects-pairs-import", args=[project.slug]),
        {"file": SimpleUploadedFile("pairs.jsonl", data)},
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "1</strong> pair added" in page
    assert "missing field &#x27;response&#x27;" in page


def test_pairs_can_be_added_edited_deleted_and_exported_in_the_browser_flow(owner_client, project):
    url = reverse("projects-pairs", args=[project.slug])
    response = owner_client.post(url, {"instruction": "Q1", "input": "", "response": "A1"})
    assert response.status_code == 302
    pair = project.pairs.get()
    assert pair.source == InstructionPair.Source.MANUAL
    edit = reverse("projects-pair-edit", args=[project.slug, pair.pk])
    assert (
        owner_client.post(edit, {"instruction": "Q1 edited", "input": "", "response": "A1"}).status_code
        == 302
    )
    pair.refresh_from_db()
    assert pair.instruction == "Q1 edited"
    export = owner_client.get(reverse("projects-pairs-export", args=[project.slug]))
    assert json.loads(export.content.decode().strip())["instruction"] == "Q1 edited"
    assert "attachment" in export["Content-Disposition"]
    owner_client.post(reverse("projects-pair-delete", args=[project.slug, pair.pk]))
    assert not project.pairs.exists()


def test_an_empty_form_pair_is_refused_with_a_message(owner_client, project):
    response = owner_client.post(
        reverse("projects-pairs", args=[project.slug]), {"instruction": "   ", "input": "", "response": "A"}
    )
    assert response.status_code == 400
    assert not project.pairs.exists()
