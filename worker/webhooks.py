"""Webhook delivery: a sender thread in every worker POSTs due events, signed, to tenants' URLs.

Signature: headers `driftsafe-timestamp` (Unix seconds) and `driftsafe-signature: v1=<hex>`; a
receiver recomputes HMAC-SHA256(secret, f"{timestamp}.{body}") and rejects old timestamps to stop
replays. The body is the event with the delivery's `id` (`whdel_<n>`; the `driftsafe-delivery`
header carries the same n, as it always has), the same on every retry: delivery is at least once
(a sender that dies, or cannot record an outcome before its lease ends, leaves the row to be sent
again), so receivers drop ids they have seen. Failures back off exponentially (10 s, 20 s, 40 s,
... capped at an hour) up to MAX_ATTEMPTS.

An endpoint cannot hurt the service:
- rows are claimed before sending (SELECT ... FOR UPDATE SKIP LOCKED, then leased by pushing
  next_attempt_at past the deadline), so two workers never send the same row; no transaction is
  open while sending; a sender that dies mid-batch leaves its rows to be retried when the lease
  ends; a batch takes at most PER_TENANT rows of one tenant, so one tenant's dead endpoints
  cannot fill it;
- a batch is sent concurrently, each delivery under a wall-clock deadline from DNS lookup to
  status line (`settings.webhook_deadline_seconds`), so one hanging or trickling endpoint delays
  nobody else and a pass ends within about one deadline;
- the reply body is never read: status line and headers, then the connection is closed;
- the address is checked (store.netguard) at every delivery and the connection goes to that
  checked address, never to whatever a second lookup would return;
- this runs on its own thread, apart from the reaper, so requeues never wait on a webhook.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
from sqlalchemy import func, select, update

from store.db import session_scope
from store.models import WebhookDelivery, WebhookEndpoint
from store.netguard import RefusedURL, Target, TenantLookups
from store.settings import Settings
from worker.runner import with_db_retry

MAX_ATTEMPTS = 8
BATCH = 20
PER_TENANT = 4  # of a batch, so that at least five tenants' deliveries go in every pass
LEASE_MARGIN_S = 30.0  # on top of the deadline: time to record the outcome after sending
log = logging.getLogger(__name__)
# Lookups run on threads of their own, not asyncio's default pool: asyncio.run() waits for that
# pool on exit, so a lookup stuck past the deadline would hold the whole pass. Each tenant holds
# at most LOOKUPS.per_tenant of them (store.netguard.TenantLookups), as at registration.
LOOKUPS = TenantLookups(threads=16)


@dataclass(frozen=True)
class Claimed:
    id: int
    tenant_id: str
    event: str
    payload: dict
    attempts: int  # including this one
    lease: float  # the next_attempt_at we set; the outcome is written only while it still holds
    url: str
    secret: str


def delivery_id(row_id: int) -> str:
    return f"whdel_{row_id}"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def backoff_seconds(attempts: int) -> float:
    return min(3600.0, 10.0 * 2 ** (attempts - 1))


def claim_due(settings: Settings, limit: int = BATCH) -> list[Claimed]:
    """Lease up to `limit` due deliveries to this sender, in one short transaction: one UPDATE
    of the rows its subquery locked, returning what sending needs."""
    D, now = WebhookDelivery, time.time()
    lease = now + settings.webhook_deadline_seconds + LEASE_MARGIN_S
    # SKIP LOCKED: a row another sender is claiming right now is left to it (PostgreSQL; SQLite
    # runs one writer at a time, and this is a single UPDATE, so claims cannot interleave there).
    # Spelled as the partial index's predicate (NOT gave_up, not "gave_up IS false"), or
    # PostgreSQL does not use ix_webhook_deliveries_due.
    # Each tenant's PER_TENANT oldest due rows at most: a batch waits for its slowest delivery,
    # so one tenant's backlog of endpoints that never answer would otherwise fill every batch
    # and hold everyone else's deliveries behind it.
    is_due = (D.delivered_at.is_(None), ~D.gave_up, D.next_attempt_at <= now)
    turns = (select(D.id, func.row_number().over(partition_by=D.tenant_id,
                                                 order_by=D.next_attempt_at).label("turn"))
             .where(*is_due).subquery())
    # The due test again where the rows are locked: PostgreSQL re-checks a row that another
    # sender leased meanwhile against this level's conditions only, not the subquery's.
    due = (select(D.id).where(*is_due, D.id.in_(select(turns.c.id)
                                                .where(turns.c.turn <= PER_TENANT)))
           .order_by(D.next_attempt_at).limit(limit).with_for_update(skip_locked=True))
    with session_scope(settings) as s:
        rows = s.execute(update(D).where(D.id.in_(due.scalar_subquery()))
                         .values(next_attempt_at=lease, attempts=D.attempts + 1)
                         .returning(D.id, D.tenant_id, D.endpoint_id, D.event, D.payload,
                                    D.attempts)
                         .execution_options(synchronize_session=False)).all()
        endpoints = {e.id: e for e in s.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.secret)
            .where(WebhookEndpoint.id.in_({r.endpoint_id for r in rows})))}
    return [Claimed(r.id, r.tenant_id, r.event, r.payload, r.attempts, lease,
                    endpoints[r.endpoint_id].url, endpoints[r.endpoint_id].secret) for r in rows]


def pinned_request(target: Target) -> tuple[httpx.URL, dict, dict]:
    """URL, headers and extensions that connect to the checked address while the server still
    sees the original name: the Host header, and for HTTPS the SNI name and the name the
    certificate is verified against (httpcore's `sni_hostname`)."""
    url = target.url.copy_with(host=target.addresses[0])
    headers = {"host": target.url.netloc.decode("ascii")}
    try:
        ipaddress.ip_address(target.host)
        extensions = {}  # an address literal: no SNI, the certificate is checked for the address
    except ValueError:
        extensions = {"sni_hostname": target.host}
    return url, headers, extensions


async def _lookup(item: Claimed, allow_private: bool) -> Target:
    """`resolve` once the tenant has a lookup to spare; the wait counts against the delivery's
    deadline."""
    while (lookup := LOOKUPS.submit(item.tenant_id, item.url, allow_private)) is None:
        await asyncio.sleep(0.05)
    return await asyncio.wrap_future(lookup)


async def _post(client: httpx.AsyncClient, item: Claimed, allow_private: bool) -> tuple[bool, str]:
    target = await _lookup(item, allow_private)
    url, headers, extensions = pinned_request(target)
    # The delivery's id, inside what is signed: a retry carries the same one, so a receiver
    # drops what it already has (delivery is at least once).
    body = json.dumps({"id": delivery_id(item.id), **item.payload},
                      separators=(",", ":")).encode()
    ts = int(time.time())
    headers.update({"content-type": "application/json", "driftsafe-timestamp": str(ts),
                    "driftsafe-signature": sign(item.secret, ts, body),
                    "driftsafe-event": item.event, "driftsafe-delivery": str(item.id)})
    # stream(): returns once the status line and headers are in; leaving the block closes the
    # connection without reading a byte of the body.
    async with client.stream("POST", url, content=body, headers=headers,
                             extensions=extensions) as reply:
        return 200 <= reply.status_code < 300, f"HTTP {reply.status_code}"


async def _deliver(client: httpx.AsyncClient, item: Claimed,
                   settings: Settings) -> tuple[bool, str]:
    deadline = settings.webhook_deadline_seconds
    try:
        async with asyncio.timeout(deadline):
            return await _post(client, item, settings.webhook_allow_private)
    except TimeoutError:
        return False, f"no response status within the {deadline:g} s deadline"
    except RefusedURL as e:
        return False, f"refused: {e}"
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a bug in one delivery must not sink the batch
        log.exception("webhook delivery %s failed unexpectedly", item.id)
        return False, f"internal error: {type(e).__name__}"


async def deliver_all(items: list[Claimed], settings: Settings) -> list[tuple[bool, str]]:
    """Send every item at once; returns (delivered, why) per item within about one deadline."""
    # The deadline, not httpx's per-read timeouts, bounds a delivery; these only back it up.
    # trust_env=False: a proxy from the environment would connect somewhere we did not check.
    async with httpx.AsyncClient(timeout=settings.webhook_deadline_seconds, trust_env=False,
                                 follow_redirects=False,
                                 headers={"user-agent": "driftsafe-webhooks/1"}) as client:
        return list(await asyncio.gather(*(_deliver(client, i, settings) for i in items)))


def record(settings: Settings, items: list[Claimed], outcomes: list[tuple[bool, str]]) -> None:
    """Write the outcomes, riding out a database blip for as long as the rows' lease allows:
    outcomes lost to an outage make their rows due again when the lease ends, and a delivery
    that had arrived is sent again (at least once; the body's id is the same)."""
    def write() -> None:
        D, now = WebhookDelivery, time.time()
        with session_scope(settings) as s:
            for item, (ok, why) in zip(items, outcomes):
                if ok:
                    values = {"delivered_at": now, "last_error": None}
                else:
                    values = {"last_error": why[:500], "gave_up": item.attempts >= MAX_ATTEMPTS,
                              "next_attempt_at": now + backoff_seconds(item.attempts)}
                # Guarded on our lease: if it ran out and another sender took the row, theirs
                # counts.
                done = s.execute(update(D).where(D.id == item.id, D.next_attempt_at == item.lease)
                                 .values(**values).execution_options(synchronize_session=False))
                if done.rowcount != 1:
                    log.warning("webhook delivery %s: lease lost before its outcome was recorded",
                                item.id)

    with_db_retry(write, "webhook outcomes", give_up_after_s=LEASE_MARGIN_S)
    for item, (ok, why) in zip(items, outcomes):
        if not ok:  # the host only: a URL's path or query may carry the receiver's token
            log.info("webhook %s (delivery %s) to %s failed (%s), attempt %d", item.event,
                     item.id, httpx.URL(item.url).host, why, item.attempts)


def send_due(settings: Settings, limit: int = BATCH) -> list[Claimed]:
    """One pass: claim, send concurrently outside any transaction, record. The rows claimed."""
    items = claim_due(settings, limit)
    if items:
        record(settings, items, asyncio.run(deliver_all(items, settings)))
    return items


def more_may_be_due(items: list[Claimed], limit: int = BATCH) -> bool:
    """A full batch, or one in which a tenant had all its turns: more may be waiting."""
    return len(items) == limit or max(Counter(i.tenant_id for i in items).values(),
                                      default=0) >= PER_TENANT


def start_sender(settings: Settings, every_s: float = 2.0,
                 stop: threading.Event | None = None) -> threading.Thread:
    stop = stop or threading.Event()

    def loop():
        while not stop.is_set():
            try:
                more = more_may_be_due(send_due(settings))
            except Exception:  # noqa: BLE001 - a sender that dies silently would be worse
                log.exception("webhook sender pass failed")
                more = False
            if not more:  # go again at once while more may be due
                stop.wait(every_s)

    thread = threading.Thread(target=loop, name="driftsafe-webhooks", daemon=True)
    thread.start()
    return thread
