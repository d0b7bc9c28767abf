from __future__ import annotations

import secrets
import uuid
from pathlib import Path

from django.conf import settings
from django.db import models
from django.urls import reverse


def _new_salt() -> str:
    return secrets.token_hex(16)


class Project(models.Model):
    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=140, unique=True)
    description = models.TextField(blank=True)
    # Share of instruction pairs held out for evaluation; the split itself is a hash of the pair,
    # so changing this later moves pairs only at the margin, never shuffles them.
    eval_fraction = models.FloatField(default=0.1)
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="projects")
    # Redaction policy, {TYPE: "keep" | "mask" | "pseudonym"}; a type not named uses
    # projects.pii.DEFAULT_POLICY. Applied to what indexes, training and teachers read, never to
    # the stored upload, so a policy can change later.
    redaction = models.JSONField(default=dict, blank=True)
    # Builds refuse to start while a finding is kept unredacted (and not marked a false alarm).
    require_redaction = models.BooleanField(default=False)
    # People's names to find, one per line: without an offline NER model this list is how
    # names are found.
    known_names = models.TextField(blank=True)
    # Key of the hashes that stand for found values (pseudonyms are looked up by them).
    pii_salt = models.CharField(max_length=32, default=_new_salt, editable=False)
    # When documents or pairs last changed (upload, import, edit, delete): the data report and
    # the scan catch up with it.
    data_changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("projects-detail", args=[self.slug])

    @property
    def data_dir(self) -> Path:
        # By id, not slug: the folder never moves and a slug never reaches the file system.
        return Path(settings.DATA_DIR) / "projects" / str(self.pk)


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MEMBER = "member", "Member"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class Document(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Waiting to be read"
        PARSING = "parsing", "Reading"
        PARSED = "parsed", "Ready"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="documents")
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The user's file name, cleaned for display only; files on disk are named by `uid`.
    original_name = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, blank=True)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)
    title = models.CharField(max_length=300, blank=True)
    page_count = models.PositiveIntegerField(null=True, blank=True)
    section_count = models.PositiveIntegerField(default=0)
    char_count = models.PositiveIntegerField(default=0)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    parse_started_at = models.DateTimeField(null=True, blank=True)
    # "host:pid" of the process parsing it, so a parse whose process died can be handed back.
    parsing_by = models.CharField(max_length=200, blank=True)
    parsed_at = models.DateTimeField(null=True, blank=True)
    # When its text was scanned for personal data; null: not yet (builds scan it first).
    pii_scanned_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["project", "sha256"], name="document_unique_content")]

    def __str__(self) -> str:
        return self.original_name

    def get_absolute_url(self) -> str:
        return reverse("projects-document", args=[self.project.slug, self.pk])

    @property
    def file_path(self) -> Path:
        return self.project.data_dir / "docs" / str(self.uid)

    @property
    def parsed_path(self) -> Path:
        return self.project.data_dir / "docs" / f"{self.uid}.parsed.json"

    @property
    def is_settled(self) -> bool:
        return self.status in (self.Status.PARSED, self.Status.FAILED)


class PairQuerySet(models.QuerySet):
    def usable(self) -> PairQuerySet:
        """Pairs training and evaluation may read: not generated pairs still waiting for review
        (or rejected in it)."""
        return self.filter(review=InstructionPair.Review.ACCEPTED)


class InstructionPair(models.Model):
    class Split(models.TextChoices):
        TRAIN = "train", "Train"
        EVAL = "eval", "Evaluation"

    class Source(models.TextChoices):
        UPLOADED = "uploaded", "Uploaded"
        MANUAL = "manual", "Added by hand"
        GENERATED = "generated", "Generated from documents"
        DISTILLED = "distilled", "Written by a teacher model"

    class Review(models.TextChoices):
        ACCEPTED = "accepted", "Accepted"
        PENDING = "pending", "Waiting for review"
        REJECTED = "rejected", "Rejected"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pairs")
    instruction = models.TextField()
    input = models.TextField(blank=True)
    response = models.TextField()
    # sha256 of the normalised fields: duplicate detection and the stable train/eval split.
    key = models.CharField(max_length=64)
    split = models.CharField(max_length=5, choices=Split.choices)
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.UPLOADED)
    # Generated pairs wait for a person before training or evaluation reads them.
    review = models.CharField(max_length=8, choices=Review.choices, default=Review.ACCEPTED)
    # Where a generated pair came from: the document and the passage the teacher read.
    document = models.ForeignKey(
        "Document", null=True, blank=True, on_delete=models.SET_NULL, related_name="generated_pairs"
    )
    passage = models.TextField(blank=True)
    passage_id = models.CharField(max_length=64, blank=True)
    origin = models.CharField(max_length=200, blank=True)  # "teacher Llama-3 (run 4)"
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # When its fields were scanned for personal data; null: not yet, or edited since.
    pii_scanned_at = models.DateTimeField(null=True, blank=True)

    objects = PairQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["project", "key"], name="pair_unique_key")]

    def __str__(self) -> str:
        return self.instruction[:60]


class PiiFinding(models.Model):
    """One stretch of personal data or a secret, in a document section or a pair field. The
    value itself is not stored: the page shows it from the (access-controlled) original."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pii_findings")
    document = models.ForeignKey(
        Document, null=True, blank=True, on_delete=models.CASCADE, related_name="pii_findings"
    )
    pair = models.ForeignKey(
        InstructionPair, null=True, blank=True, on_delete=models.CASCADE, related_name="pii_findings"
    )
    section = models.PositiveIntegerField(null=True, blank=True)  # a document's section index
    # "heading" | "text" in a document section; "instruction" | "input" | "response" in a pair.
    field = models.CharField(max_length=12)
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    type = models.CharField(max_length=24)
    detector = models.CharField(max_length=80)
    score = models.FloatField(default=1.0)
    # Keyed hash of the normalised value (projects.pii.digest): pseudonyms and "same value" counts.
    digest = models.CharField(max_length=64)
    # A member marked it as not personal data (a version number that looks like an IP address).
    ignored = models.BooleanField(default=False)

    class Meta:
        ordering = ["document_id", "pair_id", "section", "field", "start"]
        indexes = [models.Index(fields=["project", "type"]), models.Index(fields=["project", "digest"])]

    def __str__(self) -> str:
        return f"{self.type} in {'document ' + str(self.document_id) if self.document_id else 'pair ' + str(self.pair_id)}"


class Pseudonym(models.Model):
    """The number a value gets under the pseudonym policy: the same person is [PERSON_4] in
    every document, pair and build of the project."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pseudonyms")
    type = models.CharField(max_length=24)
    digest = models.CharField(max_length=64)
    number = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "type", "digest"], name="pseudonym_unique_value"),
            models.UniqueConstraint(fields=["project", "type", "number"], name="pseudonym_unique_number"),
        ]

    def __str__(self) -> str:
        return f"[{self.type}_{self.number}]"


class DataReport(models.Model):
    """The project's dataset quality report (projects.reports), recomputed after data changes."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="data_report")
    data = models.JSONField(default=dict)
    computed_at = models.DateTimeField()
    seconds = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"Data report of {self.project}"
