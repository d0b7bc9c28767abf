from __future__ import annotations

from django.contrib.auth import login
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("projects-home")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # Named because the log-in limiter (django-axes) is a second backend that logs no one in.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("projects-home")
    return render(request, "registration/signup.html", {"form": form})


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A stale token (log-out in another tab) gets a page that says what to do, not a bare 403.

    htmx requests get the same text without the page frame, so it is not swapped into a table.
    """
    if request.headers.get("HX-Request"):
        return HttpResponse(
            "Your page was out of date. Reload the page and try again.", status=403, content_type="text/plain"
        )
    return render(request, "403_csrf.html", status=403)
