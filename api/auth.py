"""Who is calling: API-key verification with a short-lived cache, and the per-tenant rate limit.

A verified key is trusted for `key_cache_seconds` without touching the database, so an
authenticated read costs the one query that reads what was asked for. The price is that a revoked
key keeps working on an API process for at most that long (the setting says so). Unknown keys are
remembered briefly too, so a flood of bad keys does not become a flood of queries. Known and
unknown keys are kept apart, each bounded, oldest out first: a flood of random keys used to clear
the whole cache, sending every valid key's next request to the database too.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from store.keys import hash_key, tenant_for_digest

NEGATIVE_TTL_S = 5.0
MAX_CACHED_KEYS = 10_000  # of each kind: known keys, unknown keys


@dataclass(frozen=True)
class TenantRef:
    """The caller's tenant: what routes need of it, detached from any session."""

    id: str
    name: str


class KeyCache:
    def __init__(self, secret: bytes, ttl_s: float):
        self.secret, self.ttl_s = secret, ttl_s
        self._known: dict[str, tuple[TenantRef, float]] = {}
        self._unknown: dict[str, float] = {}
        self._lock = threading.Lock()

    def digest(self, clear_key: str) -> str:
        return hash_key(self.secret, clear_key)

    def cached(self, digest: str) -> tuple[bool, TenantRef | None]:
        """(found in the cache, its tenant): no database, safe on the event loop."""
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and known[1] > now:
            return True, known[0]
        if self._unknown.get(digest, 0.0) > now:
            return True, None
        return False, None

    def load(self, session_factory, digest: str) -> TenantRef | None:
        """Look the key up in the database (a cache miss) and remember the answer."""
        with session_factory() as session:
            row = tenant_for_digest(session, digest)
        tenant = TenantRef(row.id, row.name) if row else None
        ttl = self.ttl_s if tenant is not None else min(self.ttl_s, NEGATIVE_TTL_S)
        if ttl > 0:
            expires = time.monotonic() + ttl
            with self._lock:
                if tenant is not None:
                    self._unknown.pop(digest, None)
                    _remember(self._known, digest, (tenant, expires))
                else:
                    self._known.pop(digest, None)
                    _remember(self._unknown, digest, expires)
        return tenant


def _remember(entries: dict, key: str, value) -> None:
    """Insert at the newest end, dropping the oldest entries over MAX_CACHED_KEYS (dicts keep
    insertion order)."""
    entries.pop(key, None)
    while len(entries) >= MAX_CACHED_KEYS:
        del entries[next(iter(entries))]
    entries[key] = value


class RateLimiter:
    """A token bucket per tenant: `burst` requests at once, refilled at `per_minute` / 60 per
    second. Per API process: with N processes a tenant may reach N times the rate."""

    def __init__(self, per_minute: int, burst: int):
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, tenant_id: str) -> int:
        """0 if the request may go ahead (and it is counted), else seconds to wait."""
        if self.rate <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(tenant_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            if tokens >= 1:
                self._buckets[tenant_id] = (tokens - 1, now)
                return 0
            self._buckets[tenant_id] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))
