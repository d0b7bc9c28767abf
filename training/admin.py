from __future__ import annotations

from django.contrib import admin

from .models import BaseModel, Build, BuildLog, BuildStep


class BuildStepInline(admin.TabularInline):
    model = BuildStep
    extra = 0
    readonly_fields = ["index", "name", "status", "progress_current", "progress_total", "message", "metrics"]


@admin.register(Build)
class BuildAdmin(admin.ModelAdmin):
    list_display = ["pk", "project", "status", "attempts", "claimed_by", "created_at", "ended_at"]
    list_filter = ["status"]
    inlines = [BuildStepInline]


@admin.register(BuildLog)
class BuildLogAdmin(admin.ModelAdmin):
    list_display = ["build", "created_at", "level", "message"]
    list_filter = ["level"]


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    """Registering goes through the Base models page (it inspects and checks the files); here
    only names can be changed."""

    list_display = ["name", "slug", "kind", "source", "created_at"]
    readonly_fields = ["slug", "kind", "source", "hf_dir", "gguf_path", "info", "added_by", "created_at"]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False
