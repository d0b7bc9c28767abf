from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models
from django.urls import reverse

from projects.models import Project


def data_path(stored: str) -> Path | None:
    """Stored paths are relative to DATA_DIR, or absolute for files outside it (site-packages,
    the shared model cache, a folder an admin registered)."""
    if not stored:
        return None
    path = Path(stored)
    return path if path.is_absolute() else Path(settings.DATA_DIR) / path


def stored_path(path: Path) -> str:
    """How a path is kept in the database: relative to DATA_DIR when inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(settings.DATA_DIR).resolve()))
    except ValueError:
        return str(path)


class BaseModel(models.Model):
    """A model builds start from: the bundled SmolLM2, or one an admin registered."""

    class Kind(models.TextChoices):
        BUNDLED = "bundled", "Bundled"
        HF = "hf", "Local Hugging Face folder"
        GGUF = "gguf", "Local GGUF file"
        HUB = "hub", "Hugging Face hub"

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    source = models.CharField(max_length=500, help_text="The folder, file or hub id it was registered from.")
    # The safetensors folder training and conversion read (empty for a GGUF-only model), and the
    # GGUF it is served from as is (empty when it must be converted first).
    hf_dir = models.CharField(max_length=500, blank=True)
    gguf_path = models.CharField(max_length=500, blank=True)
    info = models.JSONField(default=dict, blank=True)  # training.ml.base_models.ModelInfo
    added_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("training-base-model", args=[self.slug])

    @property
    def hf_path(self) -> Path | None:
        return data_path(self.hf_dir)

    @property
    def gguf_file(self) -> Path | None:
        return data_path(self.gguf_path)


class Build(models.Model):
    """One run of a recipe for a project: the user-visible job record (Celery keeps none)."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        CANCELLING = "cancelling", "Cancelling"
        CANCELLED = "cancelled", "Cancelled"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        # Stopped at a safe point when it ran past BUILD_TIME_LIMIT; its checkpoints are kept and
        # "Resume" queues it again (build_resume).
        TIMED_OUT = "timed_out", "Timed out"

    TERMINAL = frozenset({Status.CANCELLED, Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT})
    ACTIVE = frozenset({Status.RUNNING, Status.CANCELLING})

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="builds")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    recipe = models.CharField(max_length=200, default="check")
    # None means the bundled model (builds queued before the registry existed, and the default).
    base = models.ForeignKey(
        BaseModel, null=True, blank=True, on_delete=models.PROTECT, related_name="builds"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True)
    # Times the build has been claimed by a worker: the first run plus resumes after a lost worker.
    attempts = models.PositiveIntegerField(default=0)
    # "host:pid" of the worker process running it, so a restarted worker can tell its own dead jobs.
    claimed_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # Set when the worker running the build is shutting down (a deploy's SIGTERM): the build stops
    # at its next safe point and goes back to the queue instead of finishing or failing.
    requeue_requested_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # What the wizard estimated when it started this build (training.wizard.estimate), shown next
    # to what was measured once it ends.
    estimates = models.JSONField(default=dict, blank=True)
    # The queue its task message was last sent to ("cpu"/"gpu", ops.queues) and that message's
    # token: only the newest message may claim the build, so a copy the broker redelivers late
    # (Redis, after a worker died) or one left in a queue nobody consumes finds nothing to do.
    queue = models.CharField(max_length=20, blank=True)
    dispatch_token = models.CharField(max_length=32, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    # When the broker took that message; empty while it has not (the sweep sends it again).
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"Build #{self.pk} of {self.project}"

    def get_absolute_url(self) -> str:
        return reverse("training-build-detail", args=[self.project.slug, self.pk])

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def can_cancel(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def can_resume(self) -> bool:
        return self.status == self.Status.TIMED_OUT

    @property
    def duration(self):  # type: ignore[no-untyped-def]
        if self.started_at and self.ended_at:
            return self.ended_at - self.started_at
        return None


class BuildStep(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Waiting"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Done"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=40)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    progress_current = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    # The step's key number as it arrives ("12 of 40 documents read"), shown beside its bar.
    message = models.CharField(max_length=300, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # The worker (Celery node name) that ran the step and its hardware ({"cores", "gpu"}): the
    # wizard's estimates read measurements made on hardware like the one that will run a build.
    worker = models.CharField(max_length=255, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    # Paths of what the step produced, relative to DATA_DIR (e.g. {"index_dir": "builds/3/1-rag/index"}).
    outputs = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["build", "index"], name="buildstep_unique_index")]

    def __str__(self) -> str:
        return f"{self.index}:{self.name}"

    @property
    def percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        if not self.progress_total:
            return 0
        return min(100, round(100 * self.progress_current / self.progress_total))


class BuildLog(models.Model):
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="logs")
    created_at = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=8, default="info")
    message = models.TextField()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.message[:80]


class ModelVersion(models.Model):
    """What a successful build produced: immutable, chatted with, evaluated, downloaded."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="model_versions")
    # One build may produce several versions (one per quantization type).
    build = models.ForeignKey(
        Build, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_versions"
    )
    number = models.PositiveIntegerField()
    recipe = models.CharField(max_length=200)
    base_model = models.CharField(max_length=200)
    base = models.ForeignKey(
        BaseModel, null=True, blank=True, on_delete=models.PROTECT, related_name="model_versions"
    )
    # e.g. "q4_k_m", "f16", or the bundled file's own type; "" when unknown.
    quant_type = models.CharField(max_length=20, blank=True)
    # The unquantized GGUF this one was quantized from (KL divergence is measured against it),
    # and the safetensors folder behind it (exports to other types convert from there).
    parent_gguf_path = models.CharField(max_length=500, blank=True)
    hf_dir = models.CharField(max_length=500, blank=True)
    # Paths relative to DATA_DIR, or absolute for files that ship with the installation
    # (the bundled GGUF lives in site-packages and is never copied).
    gguf_path = models.CharField(max_length=500)
    index_dir = models.CharField(max_length=500, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="modelversion_unique_number")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        return f"{self.project.name} v{self.number}"

    @property
    def api_id(self) -> str:
        """The model id clients pass to the OpenAI-compatible API."""
        return f"{self.project.slug}/v{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("inference-chat", args=[self.project.slug, self.number])

    @property
    def gguf_file(self) -> Path:
        path = data_path(self.gguf_path)
        assert path is not None
        return path

    @property
    def index_path(self) -> Path | None:
        return data_path(self.index_dir)

    @property
    def parent_gguf(self) -> Path | None:
        return data_path(self.parent_gguf_path)

    @property
    def hf_path(self) -> Path | None:
        return data_path(self.hf_dir)

    @property
    def evaluation(self) -> dict:
        return self.metrics.get("evaluate", {})


class Teacher(models.Model):
    """A larger model that writes answers for a project: distillation and pair generation."""

    class Kind(models.TextChoices):
        ENDPOINT = "endpoint", "OpenAI-compatible endpoint"
        HF = "hf", "Local Hugging Face folder"
        GGUF = "gguf", "Local GGUF file"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="teachers")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    path = models.CharField(max_length=500, blank=True)  # a local folder or file
    base_url = models.CharField(max_length=500, blank=True)  # http://host:port/v1
    model_name = models.CharField(max_length=200, blank=True)
    # Fernet-encrypted (slmstudio.lib.crypto); never shown again once saved.
    api_key_encrypted = models.TextField(blank=True)
    requests_per_minute = models.FloatField(null=True, blank=True)
    timeout_seconds = models.FloatField(default=60.0)
    max_concurrency = models.PositiveSmallIntegerField(default=2)
    added_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    checked_at = models.DateTimeField(null=True, blank=True)
    check_ok = models.BooleanField(null=True, blank=True)
    check_message = models.TextField(blank=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="teacher_unique_name")]

    def __str__(self) -> str:
        return self.name

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)

    @property
    def where(self) -> str:
        """Where it runs, for pages: the endpoint and model, or the local path."""
        return f"{self.model_name} at {self.base_url}" if self.kind == self.Kind.ENDPOINT else self.path


class GenerationRun(models.Model):
    """A background job in which a teacher writes question/answer pairs from the documents."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        CANCELLED = "cancelled", "Cancelled"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    TERMINAL = frozenset({Status.CANCELLED, Status.SUCCEEDED, Status.FAILED})

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="generation_runs")
    teacher = models.ForeignKey(Teacher, on_delete=models.CASCADE, related_name="runs")
    per_document = models.PositiveIntegerField(default=5)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=200, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)  # passages to ask about
    # Passage ids already asked about (answered, duplicate or given up on): a resumed run skips them.
    done = models.JSONField(default=list, blank=True)
    added = models.PositiveIntegerField(default=0)
    duplicates = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Generation #{self.pk} of {self.project}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class WizardState(models.Model):
    """A project's answers to the approach wizard, kept so it can be left and resumed."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="wizard")
    answers = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)


class SavedRecipe(models.Model):
    """A recipe a project keeps: its items and step settings, buildable in one click and
    exportable as YAML (training.recipe_files)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="recipes")
    name = models.CharField(max_length=200)
    recipe = models.CharField(max_length=300)  # "rag,lora,quantize:q4_k_m"
    settings = models.JSONField(default=list, blank=True)  # ["lora.epochs=1", ...]
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="recipe_unique_name")]

    def __str__(self) -> str:
        return self.name
