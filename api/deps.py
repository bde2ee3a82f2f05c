"""Typed dependencies: the request's session, its tenant, and the app's shared services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import APIError
from store.artifacts import ArtifactStore
from store.keys import tenant_for_key
from store.models import Tenant
from store.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request):
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]


def get_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="missing_api_key")
    tenant = tenant_for_key(session, settings.hmac_key(), key.strip())
    if tenant is None:
        raise APIError(401, "Incorrect or revoked API key.", type="authentication_error",
                       code="invalid_api_key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_tenant)]
