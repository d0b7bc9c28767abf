from __future__ import annotations

from django.contrib import admin

from .models import Build, BuildLog, BuildStep


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
