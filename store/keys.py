"""Tenants and API keys. A key is shown once; only its HMAC-SHA256 under the server secret is kept,
so a leaked database does not leak usable keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import ApiKey, Tenant, new_id, now

KEY_PREFIX = "dsk-"


def hash_key(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise ValueError(f"a tenant named {name!r} already exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def create_key(session: Session, secret: bytes, tenant: Tenant) -> tuple[ApiKey, str]:
    """(row, the key in clear). The clear key exists only in this return value."""
    key_id = new_id("key_")
    clear = f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, tenant_id=tenant.id, key_hash=hash_key(secret, clear))
    session.add(row)
    session.flush()
    return row, clear


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise ValueError(f"no API key with id {key_id!r}")
    row.revoked_at = row.revoked_at or now()
    return row


def tenant_for_digest(session: Session, digest: str):
    """One query: (id, name) of the tenant of a key with this HMAC digest, if the key exists and
    is not revoked; else None."""
    return session.execute(select(Tenant.id, Tenant.name)
                           .join(ApiKey, ApiKey.tenant_id == Tenant.id)
                           .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()


def tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))
