"""Typed dependencies: the request's session, its tenant, and the app's shared services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.auth import TenantRef
from api.errors import APIError
from store.artifacts import ArtifactStore
from store.settings import Settings

# The dependencies here are `async def` because they do not block (or block only on a cache
# miss, which goes to a thread): FastAPI runs a sync dependency in its threadpool, a thread hop
# per dependency per request that the hot routes (a job read) paid several times over.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request):
    # A session takes a pooled connection at its first query and gives it back when its
    # transaction ends. A GET only reads: its statements run in autocommit, one round trip each.
    state = request.app.state
    reading = request.method in ("GET", "HEAD")
    session = (state.readers if reading else state.sessions)()
    try:
        yield session
    finally:
        if reading or not session.in_transaction():
            session.close()  # autocommit: nothing to roll back, no round trip
        else:  # a ROLLBACK is a round trip: not on the event loop
            await run_in_threadpool(session.close)


async def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the session closes once the route has built its response, before a byte
# is sent. The default closes it after the response is sent, so a slow reader of a download (or
# of any reply) held a pooled connection all that while: 50 of them took every connection.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]


async def authenticated(state, authorization: str) -> TenantRef:
    """The tenant whose key an Authorization header carries (the key cache, else one query on a
    thread), or a 401."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="missing_api_key")
    digest = state.keys.digest(key.strip())
    hit, tenant = state.keys.cached(digest)
    if not hit:
        tenant = await run_in_threadpool(state.keys.load, state.sessions, digest)
    if tenant is None:
        raise APIError(401, "Incorrect or revoked API key.", type="authentication_error",
                       code="invalid_api_key")
    return tenant


async def get_tenant(request: Request) -> TenantRef:
    state = request.app.state
    tenant = await authenticated(state, request.headers.get("authorization", ""))
    wait = state.rate_limiter.retry_after(tenant.id)
    if wait:
        raise APIError(429, f"Rate limit of {state.settings.rate_limit_per_minute} requests per "
                            f"minute exceeded; retry in {wait} s.", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
    return tenant


CurrentTenant = Annotated[TenantRef, Depends(get_tenant)]
