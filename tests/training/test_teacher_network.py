"""Where teacher endpoints may be reached (training.ml.netpolicy), at registration and per request.

Address checks run through the real resolver for literal addresses and "localhost", and through a
fake getaddrinfo for names (so no test depends on /etc/hosts or DNS). The fake replaces
socket.getaddrinfo for the whole process, httpx's own lookups included: a client that resolved
the name again instead of connecting to the checked address would reach the wrong server here,
and the tests would see it. The servers are real, on 127.0.0.1 and 127.0.0.2, and count the
connections they accept, so "not contacted" means no TCP connection at all.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from django.urls import reverse

from tests.services import bare_env
from tests.teacherserver import teacher_server
from training.ml.netpolicy import EndpointPolicy, EndpointRefused, GuardedTransport, check_endpoint
from training.ml.teachers import EndpointConfig, EndpointTeacher, TeacherError
from training.models import Teacher
from training.teachers import teacher_add, teacher_check

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = EndpointPolicy(mode="public")
ANY = EndpointPolicy(mode="any")
MESSAGES = [{"role": "user", "content": "Hello?"}]
REAL_GETADDRINFO = socket.getaddrinfo


# --------------------------------------------------------------------------------------------
# A fake resolver and a server that counts connections


class FakeDNS:
    """Answers for chosen names; every other lookup (addresses, localhost) goes to the real resolver.

    `then[name]` replaces the answer after the name's next lookup: the first lookup sees
    `answers[name]`, every later one `then[name]`.
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.then: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]  # noqa: A002
        name = str(host).rstrip(".").lower()
        if name not in self.answers:
            return REAL_GETADDRINFO(host, port, family, type, proto, flags)
        self.lookups.append(name)
        addresses = self.answers[name]
        if name in self.then:
            self.answers[name] = self.then.pop(name)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port or 0, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
            for a in addresses
        ]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


class RecordingServer(ThreadingHTTPServer):
    """An OpenAI-compatible answer to every request, or a redirect to `redirect_to`."""

    daemon_threads = True

    def __init__(self, host: str, port: int = 0, redirect_to: str = "") -> None:
        self.connections = 0
        self.hosts: list[str] = []  # the Host header of each request
        self.redirect_to = redirect_to
        super().__init__((host, port), _Handler)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.connections += 1  # every accepted TCP connection, before anything is read from it
        return True

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: RecordingServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
        if self.server.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "OK"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def recording_server(
    host: str = "127.0.0.1", port: int = 0, redirect_to: str = ""
) -> Iterator[RecordingServer]:
    server = RecordingServer(host, port, redirect_to)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def refusal(url: str, policy: EndpointPolicy) -> str:
    with pytest.raises(EndpointRefused) as caught:
        check_endpoint(url, policy)
    return str(caught.value)


def client(url: str, policy: EndpointPolicy) -> EndpointTeacher:
    return EndpointTeacher(
        EndpointConfig(base_url=url, model="m", timeout_seconds=5, max_retries=0, policy=policy)
    )


# --------------------------------------------------------------------------------------------
# The address check


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8000/v1", "loopback"),
        ("http://[::1]:8000/v1", "loopback"),
        ("http://[::ffff:127.0.0.1]:8000/v1", "loopback"),  # IPv4-mapped IPv6
        ("http://2130706433:8000/v1", "loopback"),  # 127.0.0.1 as one decimal number
        ("http://0x7f000001:8000/v1", "loopback"),  # ... in hex
        ("http://017700000001:8000/v1", "loopback"),  # ... in octal
        ("http://127.1:8000/v1", "loopback"),  # ... shortened
        ("http://10.0.0.5:8000/v1", "private"),
        ("http://172.16.4.2:8000/v1", "private"),
        ("http://192.168.1.20:8000/v1", "private"),
        ("http://[fd12:3456::1]:8000/v1", "private"),  # fc00::/7
        ("http://[::ffff:192.168.1.20]:8000/v1", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fe80::1]:8000/v1", "link-local"),
        ("http://100.64.0.1:8000/v1", "carrier-grade NAT"),
        ("http://224.0.0.251:8000/v1", "multicast"),
        ("http://0.0.0.0:8000/v1", "unspecified"),
        ("http://[::]:8000/v1", "unspecified"),
        ("http://240.0.0.1:8000/v1", "inside your network"),  # reserved (Python calls it private too)
    ],
)
def test_public_refuses_every_kind_of_inner_address(url: str, kind: str) -> None:
    message = refusal(url, PUBLIC)
    assert kind in message and "TEACHER_ALLOWED_HOSTS" in message


def test_public_allows_public_addresses(dns: FakeDNS) -> None:
    dns.answers["api.teacher.example"] = ["8.8.8.8", "2001:4860:4860::8888"]
    for url in (
        "https://8.8.8.8/v1",
        "http://[2001:4860:4860::8888]:8000/v1",
        "https://api.teacher.example/v1",
    ):
        check_endpoint(url, PUBLIC)
    assert dns.lookups == ["api.teacher.example"]


def test_a_name_is_refused_when_any_of_its_addresses_is_inner(dns: FakeDNS) -> None:
    dns.answers["gpu.example.com"] = ["8.8.8.8", "10.0.0.5"]
    dns.answers["v6.example.com"] = ["2001:4860:4860::8888", "::ffff:192.168.0.9"]
    message = refusal("http://gpu.example.com:8000/v1", PUBLIC)
    assert "gpu.example.com points to 10.0.0.5" in message and "private network address" in message
    assert "192.168.0.9" in refusal("http://v6.example.com/v1", PUBLIC)
    check_endpoint("http://gpu.example.com:8000/v1", ANY)  # a LAN teacher is fine on a local install


def test_localhost_is_refused_under_public() -> None:
    # The real resolver: "localhost" is whatever this machine says it is, and it is the loopback.
    assert "localhost points to" in refusal("http://localhost:8000/v1", PUBLIC)
    assert "loopback" in refusal("http://LocalHost:8000/v1", PUBLIC)
    check_endpoint("http://localhost:8000/v1", ANY)


def test_any_allows_this_machine_and_the_lan_but_never_metadata(dns: FakeDNS) -> None:
    dns.answers["metadata.example"] = ["169.254.169.254"]
    for url in ("http://127.0.0.1:8000/v1", "http://10.0.0.5/v1", "http://[::1]:8000/v1"):
        check_endpoint(url, ANY)
    for url in (
        "http://169.254.169.254/latest",
        "http://[::ffff:169.254.169.254]/latest",
        "http://2851995648/latest",  # 169.254.169.254 as one number
        "http://[fd00:ec2::254]/latest",  # AWS's metadata over IPv6
        "http://100.100.100.200/latest",  # Alibaba Cloud's
        "http://[fe80::1]:8000/v1",
        "http://metadata.example/latest",
    ):
        assert "cloud metadata" in refusal(url, ANY), url


@pytest.mark.parametrize("policy", [ANY, PUBLIC])
def test_schemes_and_credentials_are_refused_whatever_the_policy(policy: EndpointPolicy) -> None:
    for url in ("ftp://8.8.8.8/v1", "file:///etc/passwd", "gopher://8.8.8.8:70/"):
        assert "must start with http:// or https://" in refusal(url, policy)
    for url in ("http://user:secret@8.8.8.8/v1", "https://token@8.8.8.8/v1"):
        assert "user name or password" in refusal(url, policy)
    check_endpoint("https://8.8.8.8/v1", policy)


def test_allowed_hosts_let_named_inner_teachers_through(dns: FakeDNS) -> None:
    policy = EndpointPolicy(
        mode="public", allowed_hosts=("gpu-box.internal", "10.0.3.7", "10.8.0.0/16", "169.254.169.254")
    )
    dns.answers["gpu-box.internal"] = ["10.0.3.9"]
    dns.answers["other.internal"] = ["10.0.3.9"]
    for url in (
        "http://gpu-box.internal:8000/v1",
        "http://GPU-Box.Internal.:8000/v1",  # names compare without case or the root dot
        "http://10.0.3.7:8000/v1",
        "http://10.8.44.1:8000/v1",
        "http://[::ffff:10.8.0.1]:8000/v1",
        "http://169.254.169.254/v1",  # explicitly allowed, so even this
    ):
        check_endpoint(url, policy)
    for url in ("http://10.0.3.8:8000/v1", "http://10.9.0.1:8000/v1", "http://other.internal:8000/v1"):
        assert "TEACHER_ALLOWED_HOSTS" in refusal(url, policy), url
    assert "metadata" in refusal("http://169.254.170.2/v1", policy)  # only the address named
    # An allowed name whose DNS now points at a metadata address is still refused there.
    dns.answers["gpu-box.internal"] = ["169.254.170.2"]
    assert "metadata" in refusal("http://gpu-box.internal:8000/v1", policy)


def test_the_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="'any' or 'public'"):
        EndpointPolicy(mode="open")
    with pytest.raises(ValueError, match="not a CIDR range"):
        EndpointPolicy(mode="public", allowed_hosts=("10.0.0.0/33",))


# --------------------------------------------------------------------------------------------
# Requests


def test_any_policy_reaches_a_local_teacher() -> None:
    with recording_server() as server, client(f"http://127.0.0.1:{server.port}/v1", ANY) as teacher:
        assert teacher.complete(MESSAGES, max_tokens=4) == "OK"
    assert server.connections == 1


def test_public_policy_refuses_a_local_teacher_without_connecting() -> None:
    with recording_server() as server, client(f"http://127.0.0.1:{server.port}/v1", PUBLIC) as teacher:
        with pytest.raises(TeacherError) as caught:
            teacher.complete(MESSAGES, max_tokens=4)
        result = teacher.check()
    assert caught.value.fatal and "was not contacted" in str(caught.value)
    assert not result["ok"] and "inside your network" in result["error"]
    assert server.connections == 0


def test_requests_go_to_the_checked_address_not_a_second_lookup(dns: FakeDNS) -> None:
    # The name answers 127.0.0.1 (allowed) to the check and 127.0.0.2 to any later lookup: a
    # client that resolved again when connecting would reach the second server.
    policy = EndpointPolicy(mode="public", allowed_hosts=("127.0.0.1/32",))
    with recording_server("127.0.0.1") as checked, recording_server("127.0.0.2", checked.port) as other:
        dns.answers["teacher.example"] = ["127.0.0.1"]
        dns.then["teacher.example"] = ["127.0.0.2"]
        with client(f"http://teacher.example:{checked.port}/v1", policy) as teacher:
            assert teacher.complete(MESSAGES, max_tokens=4) == "OK"
    assert checked.connections == 1 and other.connections == 0
    assert checked.hosts == [f"teacher.example:{checked.port}"]  # the name, not the address
    assert dns.lookups == ["teacher.example"]


@pytest.mark.django_db
def test_rebinding_after_registration_is_refused_when_requesting(dns: FakeDNS, project, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TEACHER_ENDPOINTS = "public"
    with recording_server() as server:
        dns.answers["teacher.example"] = ["8.8.8.8"]  # public when the teacher is registered
        teacher = teacher_add(
            project=project, name="Rebound", user=None,
            endpoint=f"http://teacher.example:{server.port}/v1", model="m",
        )  # fmt: skip
        dns.answers["teacher.example"] = ["127.0.0.1"]  # ... and this machine afterwards
        result = teacher_check(teacher=teacher)
        assert not result["ok"] and server.connections == 0
        teacher.refresh_from_db()
        assert not teacher.check_ok and "points to 127.0.0.1" in teacher.check_message
        # The same teacher, once its address is allowed, is reached: the refusal was the policy's.
        settings.TEACHER_ALLOWED_HOSTS = ["127.0.0.1"]
        assert teacher_check(teacher=teacher)["ok"] and server.connections >= 1


def test_redirects_to_an_inner_address_are_not_followed() -> None:
    policy = EndpointPolicy(mode="public", allowed_hosts=("127.0.0.1/32",))
    with recording_server("127.0.0.2") as inner:
        target = f"http://127.0.0.2:{inner.port}/v1/chat/completions"
        with (
            recording_server("127.0.0.1", redirect_to=target) as teacher_host,
            client(f"http://127.0.0.1:{teacher_host.port}/v1", policy) as teacher,
            pytest.raises(TeacherError, match="Redirects are not followed") as caught,
        ):
            teacher.complete(MESSAGES, max_tokens=4)
    assert target in str(caught.value)
    assert teacher_host.connections == 1 and inner.connections == 0


def test_every_redirect_hop_is_checked_again() -> None:
    # For callers that do follow redirects through the guard: the second hop is checked on its own.
    with recording_server("127.0.0.2") as inner:
        target = f"http://127.0.0.2:{inner.port}/v1/models"
        with recording_server("127.0.0.1", redirect_to=target) as first:
            start = f"http://127.0.0.1:{first.port}/v1/models"
            guarded = GuardedTransport(EndpointPolicy(mode="public", allowed_hosts=("127.0.0.1",)))
            with (
                httpx.Client(transport=guarded, follow_redirects=True) as http,
                pytest.raises(EndpointRefused, match="127.0.0.2"),
            ):
                http.get(start)
            assert first.connections == 1 and inner.connections == 0
            # Allowing the second host too, the same redirect is followed to it.
            both = GuardedTransport(EndpointPolicy(mode="public", allowed_hosts=("127.0.0.1", "127.0.0.2")))
            with httpx.Client(transport=both, follow_redirects=True) as http:
                assert http.get(start).json()["choices"][0]["message"]["content"] == "OK"
            assert inner.connections == 1


# --------------------------------------------------------------------------------------------
# Registration and settings


@pytest.mark.django_db
def test_registration_says_why_an_address_is_refused(owner_client, project, settings) -> None:  # type: ignore[no-untyped-def]
    url = reverse("training-teachers", args=[project.slug])
    form = {"kind": "endpoint", "name": "Inner", "model": "m"}
    page = owner_client.post(url, form | {"endpoint": "http://169.254.169.254/latest/v1"})
    assert page.status_code == 400 and "cloud metadata" in page.content.decode()
    settings.TEACHER_ENDPOINTS = "public"
    page = owner_client.post(url, form | {"endpoint": "http://10.0.0.5:8000/v1"})
    text = page.content.decode()
    assert page.status_code == 400 and "inside your network" in text and "TEACHER_ALLOWED_HOSTS" in text
    assert not Teacher.objects.filter(project=project).exists()
    settings.TEACHER_ALLOWED_HOSTS = ["10.0.0.5"]
    assert owner_client.post(url, form | {"endpoint": "http://10.0.0.5:8000/v1"}).status_code == 302


@pytest.mark.django_db
def test_local_mode_registers_and_reaches_the_local_teacher_server(project, settings) -> None:  # type: ignore[no-untyped-def]
    assert settings.TEACHER_ENDPOINTS == "any"  # the test settings are a local install's
    with teacher_server() as server:
        teacher = teacher_add(project=project, name="Local", user=None, endpoint=server.url, model="m")
        assert teacher_check(teacher=teacher)["ok"] and server.requests


def _settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    code = "import slmstudio.settings as s; print(s.TEACHER_ENDPOINTS, s.TEACHER_ALLOWED_HOSTS)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=bare_env(DATA_DIR=str(tmp_path), **env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_production_defaults_to_public_and_bad_values_stop_the_start(tmp_path: Path) -> None:
    production = {
        "SLM_PRODUCTION": "1", "ALLOWED_HOSTS": "studio.example.com", "SECRET_KEY": "k" * 60,
        "FIELD_ENCRYPTION_KEY": "7a9ZqkY2m3Sl0d5C6Yj1pQ8mXw4Rt7Uv9Hb2Nc5Ke0E=", "ALLOW_EMBEDDED_SERVICES": "1",
    }  # fmt: skip
    out = _settings_in_a_fresh_process(tmp_path, **production)
    assert out.returncode == 0 and out.stdout.split()[0] == "public", out.stderr[-2000:]
    out = _settings_in_a_fresh_process(tmp_path, TEACHER_ALLOWED_HOSTS="gpu-box.internal, 10.0.3.0/24")
    assert out.stdout.strip() == "any ['gpu-box.internal', '10.0.3.0/24']", out.stderr[-2000:]
    out = _settings_in_a_fresh_process(
        tmp_path, TEACHER_ENDPOINTS="open", TEACHER_ALLOWED_HOSTS="10.0.0.0/33"
    )
    assert out.returncode != 0
    assert "TEACHER_ENDPOINTS is 'open'" in out.stderr and "'10.0.0.0/33'" in out.stderr
