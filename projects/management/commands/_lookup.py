from __future__ import annotations

from projects.models import Project


def project_by_slug(slug: str) -> Project | None:
    return Project.objects.filter(slug=slug).first()
