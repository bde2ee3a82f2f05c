"""Idempotency-Key for POSTs (API.md): same key and body within 24 h replays the first response;
same key, other body is 422; a request still in flight with that key is 409. Keys are per tenant.

The in-flight marker is committed in its own transaction before the work starts, so a concurrent
duplicate sees it (the unique (tenant, key) constraint decides races). A 5xx or an exception
removes the marker, so a failed request can be retried with the same key.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated, Callable

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from api.deps import CurrentTenant
from api.errors import APIError
from store.models import IdempotencyRecord

TTL_SECONDS = 24 * 3600
MAX_KEY_LENGTH = 255


def fingerprint(route: str, body: object) -> str:
    """What "the same request" means: the route and a canonical form of its body."""
    blob = json.dumps([route, body], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Idempotency:
    def __init__(self, request: Request, tenant: CurrentTenant):
        self.key = request.headers.get("idempotency-key")
        self.sessions = request.app.state.sessions
        self.tenant_id = tenant.id
        self.route = f"{request.method} {request.url.path}"
        if self.key is not None and not 1 <= len(self.key) <= MAX_KEY_LENGTH:
            raise APIError(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.",
                           param="Idempotency-Key")

    def _claim(self, fingerprint: str) -> JSONResponse | None:
        """Insert the in-flight marker, or return what an earlier request with this key decides."""
        for _ in range(2):
            with self.sessions() as s:
                s.add(IdempotencyRecord(tenant_id=self.tenant_id, key=self.key,
                                        fingerprint=fingerprint))
                try:
                    s.commit()
                    return None
                except IntegrityError:
                    s.rollback()
                found = s.scalar(select(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == self.tenant_id,
                    IdempotencyRecord.key == self.key))
                if found is None:
                    continue  # removed between our insert and read: try again
                if found.created_at < time.time() - TTL_SECONDS:
                    s.delete(found)
                    s.commit()
                    continue
                if found.fingerprint != fingerprint:
                    raise APIError(422, "This Idempotency-Key was used with a different request; "
                                        "use a new key for a new request.",
                                   param="Idempotency-Key", code="idempotency_key_reused")
                if found.state == "in_flight":
                    raise APIError(409, "A request with this Idempotency-Key is still in progress.",
                                   param="Idempotency-Key", code="idempotency_in_flight")
                return JSONResponse(found.response, status_code=found.status_code,
                                    headers={"Idempotent-Replayed": "true"})
        raise APIError(409, "Idempotency-Key is contended; retry.", param="Idempotency-Key")

    def _forget(self) -> None:
        with self.sessions() as s:
            s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.tenant_id == self.tenant_id,
                                                      IdempotencyRecord.key == self.key))
            s.commit()

    def run(self, body_fingerprint: object, produce: Callable[[], JSONResponse]) -> Response:
        if self.key is None:
            return produce()
        replay = self._claim(fingerprint(self.route, body_fingerprint))
        if replay is not None:
            return replay
        try:
            response = produce()
        except APIError as e:
            if e.status >= 500:
                self._forget()
                raise
            response = JSONResponse({"error": {"message": e.message, "type": e.type,
                                               "param": e.param, "code": e.code}},
                                    status_code=e.status)
        except BaseException:
            self._forget()
            raise
        if response.status_code >= 500:
            self._forget()
            return response
        with self.sessions() as s:
            rec = s.scalar(select(IdempotencyRecord).where(
                IdempotencyRecord.tenant_id == self.tenant_id, IdempotencyRecord.key == self.key))
            rec.state, rec.status_code = "done", response.status_code
            rec.response = json.loads(response.body)
            s.commit()
        return response


IdempotencyDep = Annotated[Idempotency, Depends(Idempotency)]
