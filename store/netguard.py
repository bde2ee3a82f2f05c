"""Which addresses a webhook may reach: the one policy the API (at registration) and the worker (at
every delivery) both apply.

A webhook URL is chosen by a tenant, but the POST leaves from inside our network: unchecked, a
tenant could make the service call loopback services, cloud metadata (169.254.169.254) or anything
on the private network (SSRF). So a URL may only reach globally routable unicast addresses
(`ipaddress` `is_global`, checked again on the IPv4 address inside IPv4-mapped or -translated,
6to4 and NAT64 IPv6 forms; site-local fec0::/10 refused too) unless
`settings.webhook_allow_private` (tests, closed networks). Every address a name resolves to
must pass, since a client may pick any of them; the worker then connects to an
address it checked, so a name that re-resolves elsewhere (DNS rebinding) gains nothing.

Also refused: credentials in the URL (they would be stored and shown back in listings) and port 0.
Any other port is allowed: receivers often listen on 8080 or 8443, and it is the address, not the
port, that keeps internal services out of reach.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The low 32 bits are the IPv4 address a packet reaches: NAT64's well-known prefix, and SIIT's
# IPv4-translated form (::ffff:0:a.b.c.d), which `ipv4_mapped` does not read.
_CARRY_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))
# Deprecated IPv4-compatible (::a.b.c.d) and local-use NAT64 forms: `is_global` misses both.
_NEVER = (ipaddress.ip_network("::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_KINDS = (("is_loopback", "loopback"), ("is_link_local", "link-local"),
          ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
          ("is_private", "private"), ("is_reserved", "reserved"))


class RefusedURL(ValueError):
    """A webhook URL the service will not call; the message says why, for the tenant."""


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    host: str  # IDNA-encoded, without brackets
    port: int
    addresses: tuple[str, ...]  # every address the host resolved to, all allowed


def refusal(ip: IPAddress) -> str | None:
    """None if webhooks may connect to `ip`; else the kind of address it is."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return refusal(inner)
    if not ip.is_global or ip.is_multicast:
        return next((name for attr, name in _KINDS if getattr(ip, attr)), "non-public")
    if ip.version == 6 and ip.is_site_local:  # deprecated fec0::/10, which `is_global` lets by
        return "site-local"
    if ip.version == 6 and any(ip in net for net in _NEVER):
        return "reserved"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to `ip` really reaches (IPv4-mapped or -translated, 6to4,
    NAT64), if any."""
    if ip.version == 4:
        return None
    if any(ip in net for net in _CARRY_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def parse(url: str) -> httpx.URL:
    """The URL as the sender will read it (the same parser, so no parser disagreement)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise RefusedURL(f"The URL is not valid: {e}.") from None
    if parsed.scheme not in ("http", "https"):
        raise RefusedURL("Webhook URLs must start with http:// or https://.")
    if not parsed.raw_host:
        raise RefusedURL("The URL has no host.")
    if parsed.userinfo:
        raise RefusedURL("Webhook URLs must not contain credentials (user:password@); verify "
                         "the driftsafe-signature header instead.")
    if parsed.port == 0:
        raise RefusedURL("Port 0 is not a valid webhook port.")
    return parsed


def resolve(url: str, allow_private: bool) -> Target:
    """Parse `url`, resolve its host and check every address; RefusedURL says what is wrong."""
    parsed = parse(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RefusedURL(f"The host '{host}' does not resolve ({e}).") from None
    addresses = tuple(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    if not addresses:
        raise RefusedURL(f"The host '{host}' does not resolve.")
    if not allow_private:
        for address in addresses:
            kind = refusal(ipaddress.ip_address(address))
            if kind is not None:
                shown = address if address == host else f"'{host}' resolves to {address}, which"
                raise RefusedURL(f"Webhook URLs must reach a public address: {shown} is a {kind} "
                                 "address.")
    return Target(parsed, host, port, addresses)


class TenantLookups:
    """`resolve` on threads of its own, each tenant holding at most `per_tenant` of them at once.

    A caller waits for a lookup only up to its deadline, but a lookup whose nameserver never
    answers holds its thread until the resolver gives up (10-30 s): without a bound per tenant,
    one tenant's unresolvable names would take every thread from every other tenant's lookups.
    A tenant's lookup is counted until its thread is done (or it never started), not until its
    caller stopped waiting. Thread-safe: the API takes lookups on its event loop, the webhook
    sender on its own."""

    def __init__(self, threads: int, per_tenant: int = 2, name: str = "driftsafe-webhook-dns"):
        self.per_tenant = per_tenant
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def submit(self, tenant_id: str, url: str, allow_private: bool) -> Future | None:
        """The lookup's future, or None while the tenant already holds `per_tenant` of them."""
        with self._lock:
            if self._held[tenant_id] >= self.per_tenant:
                return None
            self._held[tenant_id] += 1
        lookup = self._pool.submit(resolve, url, allow_private)
        lookup.add_done_callback(lambda _: self._give_back(tenant_id))
        return lookup

    def held(self) -> int:
        """Lookups holding a thread, every tenant's."""
        with self._lock:
            return sum(self._held.values())

    def _give_back(self, tenant_id: str) -> None:
        with self._lock:
            self._held[tenant_id] -= 1
            if not self._held[tenant_id]:
                del self._held[tenant_id]
