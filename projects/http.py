"""View helpers shared by every app whose pages live inside a project."""

from __future__ import annotations

from django.http import Http404

from slmstudio.http import AuthenticatedRequest

from . import services
from .models import Project


def project_or_404(request: AuthenticatedRequest, slug: str) -> Project:
    """The project if the user is a member; 404 otherwise, so outsiders learn nothing."""
    try:
        return services.project_get_for_user(user=request.user, slug=slug)
    except Project.DoesNotExist:
        raise Http404("No such project") from None


def project_context(request: AuthenticatedRequest, project: Project, tab: str) -> dict[str, object]:
    """What the project header (name, tabs, the user's role) needs on every project page."""
    return {
        "project": project,
        "tab": tab,
        "role": services.membership_role(project=project, user=request.user),
    }
