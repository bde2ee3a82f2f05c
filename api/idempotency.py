"""Idempotency-Key for POSTs (API.md): the same key and body within the TTL replays the first
response; the same key with another body is 422. Keys are per tenant.

The stored response is written in the same transaction as the work it describes, so a crash can
leave neither a job without its record nor a record stuck "in flight". A concurrent duplicate
waits on the unique (tenant, key) index until the first commits, then replays its response (on
PostgreSQL the second INSERT blocks on the first's uncommitted row; SQLite serialises writers).

The unit of work is this object's: `produce` stages rows on the request's session without
committing (ORM objects, or plain rows with `insert`); `run` commits once and then calls what
`produce` registered with `after_commit` or, if the commit
failed, `on_rollback` (e.g. deleting a file already written to the artifact store). Work that only
reads and stages plain rows (a job's creation) says so with `reads_then_inserts`: on PostgreSQL its
reads then run in autocommit and its rows, the record among them, are one atomic INSERT
(`store.writes`), the least a keyed creation can cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.responses import JSONResponse
from store.models import IdempotencyRecord
from store.writes import Row, begin_autocommit, insert_together, one_statement

MAX_KEY_LENGTH = 255
SECRET_FIELDS = ("secret",)  # shown once, when made: never kept in a stored response


# Built once: every keyed POST runs it, and building a statement costs as much as running it.
RECORD_BY_KEY = select(IdempotencyRecord).where(
    IdempotencyRecord.tenant_id == bindparam("tenant_id"),
    IdempotencyRecord.key == bindparam("key"))


def fingerprint(route: str, body: object) -> str:
    """What "the same request" means: the route and a canonical form of its body."""
    blob = json.dumps([route, body], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class JSONBody(JSONResponse):
    """A JSON response that keeps the object it was rendered from, so that storing it for
    replays does not parse the bytes again."""

    def __init__(self, content, status_code: int = 200, headers=None):
        super().__init__(content, status_code=status_code, headers=headers)
        self.content = content


def _storable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in SECRET_FIELDS} if isinstance(body, dict) \
        else body


class Idempotency:
    def __init__(self, request: Request, tenant: CurrentTenant, session: SessionDep,
                 settings: SettingsDep):
        self.key = request.headers.get("idempotency-key")
        # The request's session, tenant and settings: a route that takes this object needs no
        # dependencies of its own (each one FastAPI resolves is a cost on every request).
        self.session, self.tenant, self.settings = session, tenant, settings
        self.ttl_s = settings.idempotency_ttl_seconds
        self.route = f"{request.method} {request.url.path}"
        self._after: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []
        self._rows: list[Row] = []
        if self.key is not None and not (1 <= len(self.key) <= MAX_KEY_LENGTH
                                         and self.key.isprintable()):
            raise APIError(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable "
                                "characters.", param="Idempotency-Key",
                           code="invalid_idempotency_key")

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)

    def on_rollback(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def insert(self, model: type, values: dict) -> None:
        """Stage a plain row (every column given), written with the others at commit."""
        self._rows.append((model, values))

    def _find(self) -> IdempotencyRecord | None:
        return self.session.scalar(RECORD_BY_KEY, {"tenant_id": self.tenant.id, "key": self.key})

    def _replay(self, found: IdempotencyRecord, fp: str) -> Response:
        if found.fingerprint != fp:
            raise APIError(422, "This Idempotency-Key was used with a different request; use a "
                                "new key for a new request.", param="Idempotency-Key",
                           code="idempotency_key_reused")
        return JSONResponse(found.response, status_code=found.status_code,
                            headers={"Idempotent-Replayed": "true"})

    def _rollback(self) -> None:
        self.session.rollback()
        for undo in self._undo:
            undo()

    def _fresh(self, found: IdempotencyRecord) -> bool:
        return found.state == "done" and found.created_at >= time.time() - self.ttl_s

    def run(self, body_fingerprint: object, produce: Callable[[], JSONResponse], *,
            look_first: bool = False, reads_then_inserts: bool = False) -> Response:
        """Produce and commit the response with its record. A key already used is found when its
        record's INSERT meets the unique index: almost every key is new, so there is no lookup
        first unless `look_first` (for work too costly to do just to throw away: an upload).
        `reads_then_inserts`: `produce` only reads and stages rows with `insert`."""
        autocommit = reads_then_inserts and one_statement(self.session)
        fp = fingerprint(self.route, body_fingerprint) if self.key is not None else None
        if look_first and self.key is not None:
            found = self._find()
            self.session.rollback()  # no transaction held open while `produce` works
            if found is not None and self._fresh(found):
                return self._replay(found, fp)
        freed = False
        while True:  # a second pass only after freeing an expired key
            self._after, self._undo, self._rows = [], [], []
            if autocommit:
                begin_autocommit(self.session)
            try:
                response = produce()
            except APIError as e:
                self._rollback()
                if self.key is None:
                    raise
                if e.status >= 500 or e.status == 429:
                    # Not stored (a retry may succeed), but a retry of a request that did succeed
                    # (its job now counting against a quota, say) must still get its answer.
                    found = self._find()
                    if found is not None and self._fresh(found):
                        return self._replay(found, fp)
                    raise
                response = JSONResponse({"error": {"message": e.message, "type": e.type,
                                                   "param": e.param, "code": e.code}},
                                        status_code=e.status, headers=e.headers)
            except BaseException:
                self._rollback()
                raise
            try:
                if self.key is not None:
                    self._rows.append((IdempotencyRecord, dict(
                        tenant_id=self.tenant.id, key=self.key, fingerprint=fp, state="done",
                        status_code=response.status_code,
                        response=_storable(response.content if isinstance(response, JSONBody)
                                           else json.loads(response.body)),
                        created_at=time.time())))
                if self._rows:
                    insert_together(self.session, self._rows)
                self.session.commit()
            except IntegrityError:
                self._rollback()
                found = self._find() if self.key is not None else None
                if found is None:
                    raise
                if self._fresh(found) or freed:  # used before, or a concurrent duplicate won
                    return self._replay(found, fp)
                # expired (or an in-flight marker of an older release): free the key, go again
                self.session.delete(found)
                self.session.commit()
                freed = True
                continue
            except BaseException:
                self._rollback()
                raise
            for fn in self._after:
                fn()
            return response


async def idempotency(request: Request, tenant: CurrentTenant, session: SessionDep,
                      settings: SettingsDep) -> Idempotency:
    """The request's unit of work (async: building it does not block, so no thread hop)."""
    return Idempotency(request, tenant, session, settings)


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]
