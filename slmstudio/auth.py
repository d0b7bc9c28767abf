"""Log-in limits: django-axes' database handler, with one limit per username and one per address."""

from __future__ import annotations

from axes.handlers.database import AxesDatabaseHandler
from django.conf import settings
from django.db.models import Sum
from django.http import HttpRequest


class LoginLimitHandler(AxesDatabaseHandler):
    """Refuses a username after LOGIN_FAILURES_PER_USERNAME recent failures and an address after
    LOGIN_FAILURES_PER_ADDRESS.

    Axes compares a single limit with whichever of its lockout parameters has most failures. A team
    in one office usually reaches us from one address (NAT, or the proxy in front of us), so with a
    single limit one person guessing another's password, or a few typos, would lock the whole team
    out. The address keeps its own, higher limit, which still stops one client trying a password
    against many usernames.
    """

    def is_locked(self, request: HttpRequest, credentials: dict | None = None) -> bool:
        if not settings.AXES_LOCK_OUT_AT_FAILURE:
            return False
        # One queryset per AXES_LOCKOUT_PARAMETERS entry, in that order: username, then address.
        by_username, by_address = (
            attempts.aggregate(n=Sum("failures_since_start"))["n"] or 0
            for attempts in self.get_user_attempts(request, credentials)
        )
        return (
            by_username >= settings.LOGIN_FAILURES_PER_USERNAME
            or by_address >= settings.LOGIN_FAILURES_PER_ADDRESS
        )
