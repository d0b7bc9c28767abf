"""Which network addresses a teacher endpoint may be reached at, free of Django.

A teacher's base URL is typed in by a user, and the web server and the workers then send requests
to it. Left open, that lets a user reach what only the server can: the cloud metadata service at
169.254.169.254 (which hands out the machine's credentials), the database, Redis, admin pages on
localhost. The policy is plain data (`EndpointPolicy`), built from the settings by the caller:

- Always: only http and https, no user name or password inside the URL, and no link-local or cloud
  metadata address.
- "public" (the production default): every address the host name resolves to must be on the
  public internet: no loopback, private (RFC 1918, fc00::/7), link-local, shared (100.64.0.0/10),
  multicast, unspecified or reserved address, however the address is spelled (2130706433,
  0x7f000001 and ::ffff:127.0.0.1 all mean 127.0.0.1; getaddrinfo reads them all).
- `allowed_hosts` names hosts and CIDR ranges that pass whatever they are (an internal vLLM box).

The check runs twice: when a teacher is registered (`check_endpoint`, so the user hears at once)
and on every request (`GuardedTransport`), because the name may point elsewhere by then (DNS
rebinding). The transport resolves the name once, checks every address, and connects to a checked
address itself, sending the name in the Host header and as the TLS server name, so the request
cannot land on an address that was not checked. Each redirect hop is a request of its own and is
checked again (the teacher client does not follow redirects at all).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

POLICIES = ("any", "public")

# Cloud metadata services outside the link-local ranges: AWS over IPv6 (IMDS), Alibaba Cloud.
# Every other cloud's (AWS, GCP, Azure, OpenStack, DigitalOcean, ECS tasks) is link-local.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))

SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that a NAT64 gateway maps to IPv4

ADVICE = "If the teacher really runs there, ask your administrator to allow it (TEACHER_ALLOWED_HOSTS)."


class EndpointRefused(ValueError):
    """A teacher address the policy refuses; the message says why and what to do, for users."""


@dataclass(frozen=True)
class EndpointPolicy:
    """`mode` is "any" or "public"; `allowed_hosts` holds host names and CIDR ranges (or single
    addresses) that are always allowed."""

    mode: str = "any"
    allowed_hosts: tuple[str, ...] = ()
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"The teacher endpoint policy is {self.mode!r}: use 'any' or 'public'.")
        names, networks = set(), []
        for entry in self.allowed_hosts:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                if "/" in entry or not entry.strip():
                    raise ValueError(f"{entry!r} in the allowed teacher hosts is not a CIDR range.") from None
                names.add(_name(entry))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_networks", tuple(networks))

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """The parsed URL when its form is acceptable (scheme, no credentials, a host); else EndpointRefused."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise EndpointRefused(f"The teacher's address is not a valid URL ({exc}).") from None
        if parsed.scheme not in ("http", "https"):
            raise EndpointRefused(
                "The teacher's address must start with http:// or https://, e.g. http://host:8000/v1."
            )
        if parsed.userinfo:
            raise EndpointRefused(
                "The teacher's address holds a user name or password (user:password@…); remove it "
                "and give the key in the API key field instead, where it is stored encrypted."
            )
        if not parsed.host:
            raise EndpointRefused("The teacher's address has no host name.")
        return parsed

    def addresses(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, each one checked, in the resolver's order.

        Raises EndpointRefused when any address is refused (a name that mixes a public and a
        private address is refused whole), and socket.gaierror when the name does not resolve.
        """
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in found:
                found.append(address)
        allowed_name = _name(host) in self._names
        for address in found:
            self._check_address(host, ipaddress.ip_address(address), metadata_only=allowed_name)
        return found

    def _check_address(self, host: str, ip: IPAddress, *, metadata_only: bool = False) -> None:
        """Refuse `ip` under the policy. `metadata_only`: the name itself is allowed, which lifts
        the public-address rule but not the metadata one (a name an administrator trusts can
        still be pointed at the metadata service by whoever controls its DNS); only an
        allowed address range lets a metadata address through."""
        # An IPv6 address that leads to an IPv4 one is judged by the IPv4 address (::ffff:127.0.0.1
        # is the loopback, not merely "private").
        embedded = _embedded_ipv4(ip)
        candidates = [*embedded, ip]
        if any(c in net for c in candidates for net in self._networks):
            return
        shown = f"{ip} (that is {', '.join(map(str, embedded))})" if embedded else str(ip)
        subject = f"The address {host}" if _is_literal(host) else f"{host} points to {shown}, which"
        for candidate in candidates:
            if candidate.is_link_local or candidate in METADATA_ADDRESSES:
                raise EndpointRefused(
                    f"{subject} is a link-local or cloud metadata address, where a cloud server "
                    f"hands out its own credentials; teachers are never reached there. {ADVICE}"
                )
        if self.mode != "public" or metadata_only:
            return
        for candidate in candidates:
            kind = _non_public_kind(candidate)
            if kind:
                raise EndpointRefused(
                    f"{subject} is {kind}. This address is inside your network, and this "
                    f"installation only reaches teachers on the public internet. {ADVICE}"
                )


def check_endpoint(url: str, policy: EndpointPolicy) -> None:
    """Registration's check: the URL's form, and every address its host resolves to now.

    A name that does not resolve (yet) passes: nothing can be reached through it, and every
    request checks again.
    """
    parsed = policy.check_url(url)
    try:
        policy.addresses(parsed.host, _port(parsed))
    except (socket.gaierror, UnicodeError):
        return


class GuardedTransport(httpx.BaseTransport):
    """Sends each request only to an address the policy accepted at that moment.

    The host is resolved once per request; every address is checked; the request then goes to
    the first address that accepts a connection, with the name kept in the Host header and as the
    TLS server name (httpx's "sni_hostname" extension), so certificates are checked against the
    name. One client talks to one base URL, so pooled connections (keyed by address) are not shared
    between names.
    """

    def __init__(self, policy: EndpointPolicy, inner: httpx.BaseTransport | None = None) -> None:
        self.policy = policy
        self._inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = self.policy.check_url(request.url)
        host = url.host
        try:
            addresses = self.policy.addresses(host, _port(url))
        except (socket.gaierror, UnicodeError) as exc:
            raise httpx.ConnectError(f"{host} does not resolve ({exc})", request=request) from exc
        extensions = dict(request.extensions)
        if url.scheme == "https" and not _is_literal(host):
            extensions["sni_hostname"] = host
        failure: httpx.ConnectError | None = None
        for address in addresses:
            pinned = httpx.Request(
                request.method,
                url.copy_with(host=address),
                headers=request.headers,  # holds Host: the name, set when the request was built
                stream=request.stream,
                extensions=extensions,
            )
            try:
                return self._inner.handle_request(pinned)
            except httpx.ConnectError as exc:  # nothing was sent: the next address may answer
                failure = exc
        assert failure is not None  # getaddrinfo returns at least one address or raises
        raise failure

    def close(self) -> None:
        self._inner.close()


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _name(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: ::ffff:a.b.c.d, 6to4, Teredo, NAT64."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        found += list(ip.teredo)
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _non_public_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address this is, in words; None for a public internet address."""
    if ip.is_unspecified:
        return "the unspecified address (this machine)"
    if ip.is_loopback:
        return "this machine's own (loopback) address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT (shared) address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "a private network address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None
