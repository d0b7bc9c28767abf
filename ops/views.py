"""Health (/healthz), metrics (/metrics) and the staff-only Workers page."""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_safe
from prometheus_client import CONTENT_TYPE_LATEST

from slmstudio.http import AuthenticatedRequest

from . import health
from .metrics import exposition
from .selectors import workers_overview

# Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its address.
_PROXY_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


def _is_staff(request: HttpRequest) -> bool:
    # request.user reads the session from the database; /healthz must answer when it is down.
    try:
        return bool(request.user.is_authenticated and request.user.is_staff)
    except Exception:
        return False


@require_safe
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """No log-in: for load balancers and monitors. 200 when ok or degraded, 503 when failing.

    Anonymous callers share one report per process for HEALTH_CACHE_SECONDS: a flood of probes
    then costs one broker connection, not one each (staff always get a fresh one)."""
    report = health.health_report(details=True) if _is_staff(request) else _anonymous_report()
    return JsonResponse(report, status=503 if report["status"] == health.FAILING else 200)


_cached: tuple[float, dict] | None = None
_cache_lock = threading.Lock()


def _anonymous_report() -> dict:
    global _cached
    with _cache_lock:
        if _cached and time.monotonic() - _cached[0] < settings.HEALTH_CACHE_SECONDS:
            return _cached[1]
        report = health.health_report(details=False)
        _cached = (time.monotonic(), report)
        return report


def _from_loopback(request: HttpRequest) -> bool:
    if any(h in request.headers for h in _PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def _has_token(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    return (
        bool(token)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(sent.strip().encode(), token.encode())
    )


@require_safe
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; for this machine's callers, or anyone with METRICS_TOKEN."""
    if not (_from_loopback(request) or _has_token(request)):
        if settings.METRICS_TOKEN:
            refused = HttpResponse(
                "A valid METRICS_TOKEN bearer token is required.\n", status=401, content_type="text/plain"
            )
            refused["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return refused
        return HttpResponse(
            "Metrics are served to this machine only (set METRICS_TOKEN to open them).\n",
            status=403,
            content_type="text/plain",
        )
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


@login_required
@require_GET
def workers(request: AuthenticatedRequest) -> HttpResponse:
    """Staff only (404 for others). htmx polls the `workers-status` partial every 5 s."""
    if not request.user.is_staff:
        raise Http404
    context = {"overview": workers_overview(user=request.user)}
    template = "ops/workers.html#workers-status" if request.htmx else "ops/workers.html"
    return render(request, template, context)
