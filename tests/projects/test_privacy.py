"""Findings, redaction policies and where they apply: the index, training and evaluation text,
teacher prompts; never the stored original. And the build guard."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects import pii
from projects.models import Document, InstructionPair, PiiFinding
from projects.privacy import (
    RedactionRequired,
    document_for_models,
    finding_set_ignored,
    findings_summary,
    pairs_for_models,
    project_scan,
    redaction_check,
    redaction_update,
)
from projects.services import (
    document_add,
    document_parse,
    document_parsed,
    documents_training_text,
    pair_create,
    pair_update,
)

pytestmark = pytest.mark.django_db

MANUAL = (
    "# Pump P-100\n\nTo reset the P-100 pump, hold the red RESET button for three seconds. "
    "Questions go to Dana Whitfield at dana.whitfield@example.com or +44 20 7946 0958.\n\n"
    "## Billing\n\nThe test card 4111 1111 1111 1111 is charged; 4111 1111 1111 1112 is an order number.\n"
)
OTHER = (
    "# Pump P-200\n\nFor the P-200, write to DANA.WHITFIELD@example.com (Dana Whitfield again) or "
    "call 020 7946 0958. Backups go to https://backup:hunter2@files.example.org/pumps.\n"
)


def _add(project, name: str, text: str) -> Document:  # type: ignore[no-untyped-def]
    document_add(project=project, stream=SimpleUploadedFile(name, text.encode()), name=name, size=None)
    document = project.documents.get(original_name=name)
    document_parse(document_id=document.pk)
    return project.documents.get(pk=document.pk)


@pytest.fixture
def manuals(project):  # type: ignore[no-untyped-def]
    redaction_update(project=project, policy={}, require_redaction=False, known_names_text="Dana Whitfield")
    _add(project, "p100.md", MANUAL)
    _add(project, "p200.md", OTHER)
    return project


def _policy(project, **policy: str) -> None:  # type: ignore[no-untyped-def]
    redaction_update(
        project=project, policy=policy, require_redaction=False, known_names_text=project.known_names
    )


def test_scan_finds_each_kind_and_scanpii_prints_the_contract(manuals):  # type: ignore[no-untyped-def]
    out = io.StringIO()
    call_command("scanpii", manuals.slug, stdout=out)
    report = json.loads(out.getvalue())
    assert report["documents"] == 2 and report["pairs"] == 0
    # The Luhn-failing number is no card; the name inside an e-mail address is the address.
    assert report["findings"] == {"PERSON": 2, "EMAIL": 2, "PHONE": 2, "CREDIT_CARD": 1, "URL_CREDENTIALS": 1}
    assert report["documents_with_findings"] == 2
    # Keep is the default for names, e-mail and phones; cards and credentials are masked.
    assert report["unredacted"] == 6
    # Nothing new: a second scan scans nothing and finds the same.
    again = io.StringIO()
    call_command("scanpii", manuals.slug, stdout=again)
    assert json.loads(again.getvalue())["scanned_now"] == {"documents": 0, "pairs": 0}


def test_mask_and_pseudonyms_reach_the_models_text_but_never_the_original(manuals):  # type: ignore[no-untyped-def]
    p100 = manuals.documents.get(original_name="p100.md")
    stored = p100.file_path.read_bytes()
    parsed_before = p100.parsed_path.read_bytes()
    _policy(manuals, EMAIL="pseudonym", PERSON="pseudonym", PHONE="pseudonym", CREDIT_CARD="mask")
    text = "\n".join(s.text for s in document_for_models(document=p100).sections)
    assert "dana.whitfield@example.com" not in text and "Dana Whitfield" not in text
    assert "[EMAIL_1]" in text and "[PERSON_1]" in text and "[PHONE_1]" in text and "[CREDIT_CARD]" in text
    assert "4111 1111 1111 1112" in text  # not a card: left alone
    # The same person, e-mail and phone (written differently) get the same placeholder elsewhere.
    p200 = manuals.documents.get(original_name="p200.md")
    other = "\n".join(s.text for s in document_for_models(document=p200).sections)
    assert other.count("[PERSON_1]") == 1 and "[EMAIL_1]" in other and "[PHONE_1]" in other
    assert "[URL_CREDENTIALS]@files.example.org" in other and "hunter2" not in other
    # Training text reads the same redacted paragraphs.
    assert not any("example.com" in t.lower() for t in documents_training_text(project=manuals))
    # The upload and its extracted text are untouched.
    assert p100.file_path.read_bytes() == stored and hashlib.sha256(stored).hexdigest() == p100.sha256
    assert p100.parsed_path.read_bytes() == parsed_before
    assert "dana.whitfield@example.com" in document_parsed(document=p100).sections[0].text


def test_pairs_are_redacted_for_models_and_an_edit_is_scanned_again(manuals):  # type: ignore[no-untyped-def]
    _policy(manuals, EMAIL="pseudonym", PERSON="mask")
    pair = pair_create(
        project=manuals,
        instruction="Who answers P-100 questions?",
        input="",
        response="Dana Whitfield, at dana.whitfield@example.com.",
    )
    (text,) = pairs_for_models(project=manuals)
    assert text.response == "[PERSON], at [EMAIL_1]."  # same number as in the documents' scan order
    assert (
        InstructionPair.objects.get(pk=pair.pk).response == "Dana Whitfield, at dana.whitfield@example.com."
    )
    pair_update(pair=pair, instruction=pair.instruction, input="", response="Write to ops@example.org.")
    assert not pair.pii_findings.exists()
    (text,) = pairs_for_models(project=manuals)
    assert text.response == "Write to [EMAIL_2]."


def test_false_alarms_are_kept_and_the_guard_refuses_builds(manuals, owner, owner_client):  # type: ignore[no-untyped-def]
    from training.services import build_start

    project_scan(project=manuals)
    redaction_update(project=manuals, policy={}, require_redaction=True, known_names_text=manuals.known_names)
    with pytest.raises(RedactionRequired) as refused:
        build_start(project=manuals, user=owner, recipe="rag")
    assert refused.value.count == 6
    # The builds page says why, with a link to the findings.
    response = owner_client.post(
        reverse("training-build-new", args=[manuals.slug]), {"rag": "1"}, follow=True
    )
    page = response.content.decode()
    assert "still kept as is" in page and reverse("projects-privacy", args=[manuals.slug]) in page
    # A "check" build reads nothing out: allowed.
    build_start(project=manuals, user=owner, recipe="check")
    # Mask e-mail and phones, pseudonymise names: clear.
    redaction_update(
        project=manuals,
        policy={"EMAIL": "mask", "PHONE": "mask", "PERSON": "pseudonym"},
        require_redaction=True,
        known_names_text=manuals.known_names,
    )
    redaction_check(project=manuals)
    # Back to keep for phones, but the phone findings are marked as not personal data.
    redaction_update(
        project=manuals,
        policy={"EMAIL": "mask", "PERSON": "pseudonym"},
        require_redaction=True,
        known_names_text=manuals.known_names,
    )
    phone = PiiFinding.objects.filter(project=manuals, type="PHONE").first()
    owner_client.post(reverse("projects-finding-ignore", args=[manuals.slug, phone.pk]), {"ignored": "1"})
    # Both spellings of the number are the same value: both ignored.
    assert not PiiFinding.objects.filter(project=manuals, type="PHONE", ignored=False).exists()
    redaction_check(project=manuals)
    assert findings_summary(project=manuals)["findings"].get("PHONE") is None


def test_a_new_document_with_findings_stops_the_build_at_parse(
    manuals, owner, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    from training.models import Build
    from training.services import build_run, build_start

    redaction_update(
        project=manuals,
        policy={"EMAIL": "mask", "PHONE": "mask", "PERSON": "mask"},
        require_redaction=True,
        known_names_text=manuals.known_names,
    )
    build = build_start(project=manuals, user=owner, recipe="rag")
    _add(manuals, "new.md", "# New\n\nAsk at 192.168.10.20 on the plant network.\n")  # unscanned yet
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.FAILED and "requires redaction" in build.error
    assert build.steps.get(name="parse").status == "failed"


def test_the_index_holds_redacted_text(manuals, owner):  # type: ignore[no-untyped-def]
    from training.models import Build
    from training.services import build_run, build_start

    _policy(manuals, EMAIL="mask", PERSON="pseudonym", PHONE="mask")
    build = build_start(project=manuals, user=owner, steps=[{"name": "parse"}, {"name": "rag"}])
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    from pathlib import Path

    from django.conf import settings

    index_dir = Path(build.steps.get(name="rag").outputs["index_dir"])
    chunks = (
        (index_dir if index_dir.is_absolute() else settings.DATA_DIR / index_dir)
        .joinpath("chunks.jsonl")
        .read_text()
    )
    assert "example.com" not in chunks.lower() and "Whitfield" not in chunks
    assert "[EMAIL]" in chunks and "[PERSON_1]" in chunks and "hunter2" not in chunks


@pytest.mark.django_db(transaction=True)  # the run is sent to the (eager) worker on commit
def test_teacher_prompts_are_redacted(manuals):  # type: ignore[no-untyped-def]
    from tests.teacherserver import teacher_server
    from training.models import Teacher
    from training.teachers import teacher_add

    _policy(manuals, EMAIL="pseudonym", PERSON="pseudonym", PHONE="mask")
    with teacher_server() as server:
        teacher = teacher_add(project=manuals, name="T", user=None, endpoint=server.url, model="m")
        Teacher.objects.filter(pk=teacher.pk).update(timeout_seconds=5)
        out = io.StringIO()
        call_command(
            "generatepairs",
            manuals.slug,
            "--teacher",
            str(teacher.pk),
            "--per-document",
            "5",
            "--wait",
            stdout=out,
        )
        sent = json.dumps(server.requests)
    assert json.loads(out.getvalue())["added"] >= 1
    assert "example.com" not in sent.lower() and "Whitfield" not in sent and "7946" not in sent
    assert "[EMAIL_1]" in sent and "[PHONE]" in sent
    # The passage stored with a generated pair is what the teacher read.
    generated = manuals.pairs.filter(source=InstructionPair.Source.GENERATED)
    assert generated.exists() and not any("example.com" in p.passage.lower() for p in generated)


def test_the_privacy_page_shows_findings_in_context_and_saves_the_policy(
    manuals, owner_client, member_client, outsider_client
):  # type: ignore[no-untyped-def]
    project_scan(project=manuals)
    url = reverse("projects-privacy", args=[manuals.slug])
    page = owner_client.get(url).content.decode()
    assert "No name-recognition model is installed" in page or "name-recognition model" in page
    assert "<mark>dana.whitfield@example.com</mark>" in page and "Payment card numbers" in page
    assert "[CREDIT_CARD]" in page  # what the masked card becomes
    assert outsider_client.get(url).status_code == 404
    everything_masked = {f"policy_{t}": "mask" for t in pii.TYPES} | {
        "require_redaction": "on",
        "known_names": "Dana Whitfield",
    }
    # Only owners set the policy; members see it (disabled).
    policy_url = reverse("projects-privacy-policy", args=[manuals.slug])
    assert member_client.post(policy_url, everything_masked).status_code == 403
    assert "Only the project's owners change the policy" in member_client.get(url).content.decode()
    owner_client.post(policy_url, everything_masked)
    manuals.refresh_from_db()
    assert manuals.require_redaction and pii.policy_with_defaults(manuals.redaction)["EMAIL"] == "mask"
    # The document's page links to its findings.
    p100 = manuals.documents.get(original_name="p100.md")
    detail = owner_client.get(reverse("projects-document", args=[manuals.slug, p100.pk])).content.decode()
    assert f"?document={p100.pk}#findings" in detail
    filtered = owner_client.get(url + "?type=EMAIL").content.decode()
    assert (
        "<mark>dana.whitfield@example.com</mark>" in filtered
        and "<mark>4111 1111 1111 1111</mark>" not in filtered
    )


def test_a_false_alarm_stays_one_wherever_the_value_turns_up(manuals, owner):  # type: ignore[no-untyped-def]
    from training.services import build_start

    redaction_update(
        project=manuals,
        policy={"EMAIL": "mask", "PERSON": "mask"},
        require_redaction=True,
        known_names_text=manuals.known_names,
    )
    project_scan(project=manuals)
    for finding in PiiFinding.objects.filter(project=manuals, type="PHONE"):
        finding_set_ignored(finding=finding, ignored=True)
    redaction_check(project=manuals)
    # The same number in a new document and in an edited pair: still not personal data.
    _add(manuals, "p300.md", "# Pump P-300\n\nCall +44 20 7946 0958 for the P-300.\n")
    pair = pair_create(project=manuals, instruction="Hotline?", input="", response="See the manual.")
    pair_update(pair=pair, instruction="Hotline?", input="", response="Call 020 7946 0958.")
    redaction_check(project=manuals)
    assert PiiFinding.objects.filter(project=manuals, type="PHONE").count() == 4
    # A generated pair waiting for review is read by no build: its findings do not block one.
    waiting = pair_create(
        project=manuals, instruction="Billing?", input="", response="Ask billing@example.net."
    )
    InstructionPair.objects.filter(pk=waiting.pk).update(review=InstructionPair.Review.PENDING)
    redaction_update(
        project=manuals,
        policy={"PERSON": "mask"},
        require_redaction=True,
        known_names_text=manuals.known_names,
    )
    project_scan(project=manuals)
    with pytest.raises(RedactionRequired) as refused:
        build_start(project=manuals, user=owner, recipe="rag")
    assert refused.value.count == 2  # the two e-mails in the documents, not the waiting pair's


def test_a_title_taken_from_the_text_is_redacted_with_it(project):  # type: ignore[no-untyped-def]
    redaction_update(
        project=project, policy={"PERSON": "pseudonym"}, require_redaction=False, known_names_text="Jane Doe"
    )
    document = _add(project, "payslip.txt", "Jane Doe: payslip for March\n\nNet pay 2,310.00.\n")
    assert document.title.startswith("Jane Doe")
    parsed = document_for_models(document=document)
    assert parsed.title == "[PERSON_1]: payslip for March"
    assert parsed.sections[0].text.startswith("[PERSON_1]: payslip")


def test_a_changed_name_list_waits_for_a_new_scan(manuals):  # type: ignore[no-untyped-def]
    project_scan(project=manuals)
    assert not manuals.documents.filter(pii_scanned_at__isnull=True).exists()
    changed = redaction_update(
        project=manuals, policy={}, require_redaction=False, known_names_text="Marek Nowak"
    )
    assert changed and manuals.documents.filter(pii_scanned_at__isnull=True).count() == 2
    project_scan(project=manuals)
    assert findings_summary(project=manuals)["findings"].get("PERSON") is None  # Dana is no longer listed


def test_pair_generation_is_refused_while_findings_are_kept(manuals):  # type: ignore[no-untyped-def]
    from training.teachers import generation_start, teacher_add

    project_scan(project=manuals)
    redaction_update(project=manuals, policy={}, require_redaction=True, known_names_text=manuals.known_names)
    teacher = teacher_add(project=manuals, name="T", user=None, endpoint="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(RedactionRequired):
        generation_start(project=manuals, teacher=teacher, per_document=2, user=None)
