from __future__ import annotations

from django.contrib import admin

from .models import Document, InstructionPair, Membership, Project


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    inlines = [MembershipInline]


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["original_name", "project", "status", "kind", "size", "created_at"]
    list_filter = ["status", "kind"]
    search_fields = ["original_name", "title", "sha256"]
    readonly_fields = ["uid", "sha256", "size"]


@admin.register(InstructionPair)
class InstructionPairAdmin(admin.ModelAdmin):
    list_display = ["instruction", "project", "split", "source"]
    list_filter = ["split", "source"]
    search_fields = ["instruction", "response"]
