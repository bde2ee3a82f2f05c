"""Webhook delivery: POST the event with an HMAC-SHA256 signature over "timestamp.body".

Headers: `driftsafe-timestamp` (Unix seconds) and `driftsafe-signature: v1=<hex>`; a receiver
recomputes HMAC(secret, f"{timestamp}.{body}") and rejects old timestamps to stop replays.
Failures back off exponentially (10 s, 20 s, 40 s, ... capped at an hour) up to MAX_ATTEMPTS.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import WebhookDelivery, WebhookEndpoint, by_public_id

MAX_ATTEMPTS = 8
TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def backoff_seconds(attempts: int) -> float:
    return min(3600.0, 10.0 * 2 ** (attempts - 1))


def deliver_due(session: Session, limit: int = 20) -> int:
    """Try the deliveries whose time has come; returns how many were delivered."""
    due = list(session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.delivered_at.is_(None),
                                      WebhookDelivery.gave_up.is_(False),
                                      WebhookDelivery.next_attempt_at <= time.time())
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
    delivered = 0
    for d in due:
        endpoint = by_public_id(session, WebhookEndpoint, d.endpoint_id)
        body = json.dumps(d.payload, separators=(",", ":")).encode()
        ts = int(time.time())
        d.attempts += 1
        try:
            r = httpx.post(endpoint.url, content=body, timeout=TIMEOUT_S, headers={
                "content-type": "application/json", "driftsafe-timestamp": str(ts),
                "driftsafe-signature": sign(endpoint.secret, ts, body),
                "driftsafe-event": d.event, "driftsafe-delivery": str(d.id)})
            ok, why = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        if ok:
            d.delivered_at = time.time()
            delivered += 1
        else:
            d.last_error = why[:500]
            d.gave_up = d.attempts >= MAX_ATTEMPTS
            d.next_attempt_at = time.time() + backoff_seconds(d.attempts)
            log.info("webhook %s to %s failed (%s), attempt %d", d.event, endpoint.url, why,
                     d.attempts)
        session.commit()
    return delivered
