"""Container health check for the web server: exit 0 when URL answers 200, else 1.

    python docker/healthcheck.py http://127.0.0.1:8000/healthz

Slim images have no curl, so this uses only the standard library. In production the app only
answers requests for its own host names (ALLOWED_HOSTS) and redirects plain http to https, so the
check asks as the proxy in front would: for the first configured host name, saying the original
request was https. A redirect is a failure, not followed.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def host_header(allowed_hosts: str) -> str | None:
    """The first concrete name in ALLOWED_HOSTS ("*" and an empty list give none)."""
    for name in allowed_hosts.split(","):
        name = name.strip().lstrip(".")
        if name and name != "*":
            return name
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def check(url: str, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, headers={"X-Forwarded-Proto": "https"})
    host = host_header(os.environ.get("ALLOWED_HOSTS", ""))
    if host:
        request.add_header("Host", host)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/healthz"))
