"""The project's "Data quality" page: the stored report, its state, and Recompute."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from projects.http import project_context, project_or_404
from projects.models import DataReport
from slmstudio.http import AuthenticatedRequest

from . import reports


@login_required
@require_GET
def data_report(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    report = DataReport.objects.filter(project=project).first()
    current = reports.report_is_current(project=project, report=report)
    # Out of date with a change recorded: a task was sent when it changed, so it is on its way.
    computing = not current and project.data_changed_at is not None
    context = project_context(request, project, "quality") | {
        "report": report,
        "data": report.data if report else {},
        "current": current,
        "computing": computing,
        "age_minutes": reports.report_age_minutes(report.computed_at) if report else None,
    }
    if request.htmx:
        # The polled region; once the report is current the swapped-in copy polls no more.
        status = HTMX_STOP_POLLING if not computing else 200
        return render(request, "training/data_report.html#report-body", context, status=status)
    return render(request, "training/data_report.html", context)


@login_required
@require_POST
def data_report_recompute(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    reports.report_request(project=project)
    return redirect("training-data-report", slug=project.slug)
