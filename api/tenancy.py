"""The one path by which routes read tenant data: every query is scoped to the caller's tenant,
so isolation cannot be forgotten route by route. Another tenant's object is simply not found."""

from __future__ import annotations

from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from api.auth import TenantRef
from api.errors import APIError, not_found
from store.models import Tenant

T = TypeVar("T")


@lru_cache
def _by_id(model) -> Select:
    """One object of one tenant, built once per model with bound parameters: a lookup by id is
    the hottest query, and building the statement anew (and its cache key) cost as much as
    running it."""
    return select(model).where(model.tenant_id == bindparam("tenant_id"),
                               model.id == bindparam("id"))


class Scoped:
    def __init__(self, session: Session, tenant: TenantRef):
        self.session, self.tenant = session, tenant

    def take_turns(self) -> None:
        """Hold the tenant's row until this transaction ends: writes of one tenant that check a
        quota then take turns from here to their commit, so two cannot both fit under it. FOR NO
        KEY UPDATE: inserts of rows referencing the tenant still go on. SQLite has no row locks
        and skips this (concurrent writers there may overshoot a quota)."""
        self.session.execute(select(Tenant.id).where(Tenant.id == self.tenant.id)
                             .with_for_update(key_share=True))

    def select(self, model: type[T]) -> Select:
        return select(model).where(model.tenant_id == self.tenant.id)

    def find(self, model: type[T], object_id: str) -> T | None:
        return self.session.scalar(_by_id(model), {"tenant_id": self.tenant.id, "id": object_id})

    def get(self, model: type[T], object_id: str, what: str, param: str | None = None) -> T:
        row = self.find(model, object_id)
        if row is None:
            raise not_found(what, object_id, param)
        return row

    def page(self, query: Select, model, *, after: str | None, limit: int) -> tuple[list, bool]:
        """Newest first; `after` is the id of the last object of the previous page."""
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be between 1 and 100.", param="limit")
        if after:
            cursor = self.find(model, after)
            if cursor is None:
                raise APIError(400, f"No object with id '{after}' to page after.", param="after")
            query = query.where(model.seq < cursor.seq)
        rows = list(self.session.scalars(query.order_by(model.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit


def list_body(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
