"""/v1/webhooks: a tenant registers URLs that receive signed job-finished events."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.idempotency import IdempotencyDep
from api.responses import JSONResponse
from api.schemas import (
    DeletedObject,
    ListOf,
    ObjectId,
    PageAfter,
    PageLimit,
    WebhookCreate,
    WebhookObject,
    webhook_object,
)
from api.tenancy import Scoped, list_body
from store.models import WebhookEndpoint
from store.netguard import RefusedURL, TenantLookups

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
ALL_EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


# Registration resolves the URL's host on threads of its own, within webhook_deadline_seconds:
# a name whose nameserver never answers would otherwise hold one of the API's few request threads
# for the resolver's timeouts (10-30 s), and a few such registrations would hold them all. Each
# tenant holds at most LOOKUPS.per_tenant of those threads (store.netguard.TenantLookups).
LOOKUPS = TenantLookups(threads=8)


@router.post("", response_model=WebhookObject,
             summary="Register a webhook endpoint (its signing secret is shown once)")
async def create_webhook(body: WebhookCreate, session: SessionDep, tenant: CurrentTenant,
                         idem: IdempotencyDep, settings: SettingsDep):
    # Refused here so the tenant learns at once; the worker checks again at every delivery,
    # because what a name resolves to can change after registration.
    await _check_url(body.url, tenant.id, settings)

    def produce() -> JSONResponse:
        scoped = Scoped(session, tenant)
        scoped.take_turns()  # concurrent registrations cannot overshoot the cap
        registered = session.scalar(select(func.count()).select_from(WebhookEndpoint)
                                    .where(WebhookEndpoint.tenant_id == tenant.id))
        if registered >= settings.max_webhook_endpoints:
            # Each endpoint is one delivery per job ending: uncapped, one tenant's endpoints
            # that never answer would fill every sender's batches.
            raise APIError(429, f"This organization already has {registered} webhook endpoints; "
                                f"the limit is max_webhook_endpoints="
                                f"{settings.max_webhook_endpoints}. Delete one first.",
                           type="rate_limit_error", code="quota_webhook_endpoints")
        secret = "whsec_" + secrets.token_urlsafe(32)
        row = WebhookEndpoint(tenant_id=tenant.id, url=body.url, secret=secret,
                              events=body.events or ALL_EVENTS)
        session.add(row)
        session.flush()  # its id; `idem.run` commits it with the key's record, or neither
        return JSONResponse(webhook_object(row, secret))

    return await run_in_threadpool(idem.run, body.model_dump(), produce)


async def _check_url(url: str, tenant_id: str, settings) -> None:
    deadline = settings.webhook_deadline_seconds
    lookup = LOOKUPS.submit(tenant_id, url, settings.webhook_allow_private)
    if lookup is None:
        raise APIError(429, f"{LOOKUPS.per_tenant} of this organization's webhook URLs are still "
                            "being resolved; retry when they are done.", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": f"{deadline:.0f}"})
    try:
        await asyncio.wait_for(asyncio.wrap_future(lookup), deadline)
    except RefusedURL as e:
        raise APIError(400, str(e), param="url", code="invalid_url") from None
    except TimeoutError:
        raise APIError(400, f"The URL's host did not resolve within {deadline:g} s.",
                       param="url", code="invalid_url") from None


@router.get("", response_model=ListOf, summary="List webhook endpoints")
def list_webhooks(session: SessionDep, tenant: CurrentTenant, after: PageAfter = None,
                  limit: PageLimit = 20):
    scoped = Scoped(session, tenant)
    rows, more = scoped.page(scoped.select(WebhookEndpoint), WebhookEndpoint, after=after,
                             limit=limit)
    return list_body([webhook_object(w) for w in rows], more)


@router.delete("/{webhook_id}", response_model=DeletedObject, summary="Delete a webhook endpoint")
def delete_webhook(webhook_id: ObjectId, session: SessionDep, tenant: CurrentTenant):
    row = Scoped(session, tenant).get(WebhookEndpoint, webhook_id, "webhook endpoint")
    session.delete(row)
    session.commit()
    return {"id": webhook_id, "object": "webhook_endpoint", "deleted": True}
