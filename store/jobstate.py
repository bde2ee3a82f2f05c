"""The one home of job state: the statuses, the active and finished sets, and the guarded
transition every path (claim, finish, reap, cancel) goes through.

A transition is one UPDATE guarded by the states it may leave (and any extra conditions the caller
adds, such as "still owned by this worker"), so two actors racing on one job cannot both win. The
winner's event row and, for a finished job, its webhook rows are written in the same transaction;
the caller commits (services never commit, the request or task boundary does).

  queued  --claim-->  running  --finish-->  succeeded | failed | cancelled
  running --reap (stale heartbeat)-->  queued (resumes) | failed | cancelled (cancel was asked)
  queued  --cancel-->  cancelled
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable

from sqlalchemy import Index, select, text, update
from sqlalchemy.orm import Session

from store.models import (
    Job,
    JobEvent,
    WebhookDelivery,
    WebhookEndpoint,
    by_public_id,
    new_id,
    now,
)


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING})
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# The queued jobs with no wake-up message recorded: what every worker's relay reads on each pass
# (worker/relay.py), through this partial index, however long the backlog already sent.
UNSENT_MESSAGE = text(f"status = '{JobStatus.QUEUED.value}' AND enqueued_at IS NULL")
Index("ix_jobs_unsent", Job.seq, postgresql_where=UNSENT_MESSAGE, sqlite_where=UNSENT_MESSAGE)


def transition(session: Session, job_id: str, to: JobStatus, *, leaving: Iterable[JobStatus],
               where: Iterable = (), values: dict | None = None, message: str | None = None,
               level: str = "info") -> Job | None:
    """Move the job to `to` if it is in one of `leaving` (and `where` holds); else None.

    On success the job row is reloaded, `message` becomes an event, and a finished job gets its
    webhook deliveries, all in the caller's transaction.
    """
    leaving = [JobStatus(s) for s in leaving]
    values = dict(values or {})
    if to in FINISHED:
        values.setdefault("finished_at", now())
        values.setdefault("heartbeat_at", None)
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(leaving), *where)
        .values(status=to.value, **values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return None
    job = by_public_id(session, Job, job_id)
    session.refresh(job)
    if message:
        add_event(session, job, message, level=level)
    if to in FINISHED:
        enqueue_webhooks(session, job)
    return job


def add_event(session: Session, job: Job, message: str, *, level: str = "info",
              type: str = "message", data: dict | None = None) -> None:
    session.add(JobEvent(**event_values(job, message, level=level, type=type, data=data)))


def event_values(job: Job, message: str, *, level: str = "info", type: str = "message",
                 data: dict | None = None) -> dict:
    """An event row's every column (a plain row for `store.writes` has no defaults applied)."""
    return dict(id=new_id("ftevent-"), created_at=now(), tenant_id=job.tenant_id, job_id=job.id,
                level=level, message=message, type=type, data=data)


def enqueue_webhooks(session: Session, job: Job) -> None:
    """Deliveries are rows, sent later by the webhook sender: a slow endpoint never holds a job."""
    from store.public import job_object

    event = f"fine_tuning.job.{job.status}"
    endpoints = session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.disabled.is_(False)))
    payload = None
    for ep in endpoints:
        if event in (ep.events or []):
            payload = payload or {"object": "event", "type": event, "created_at": now(),
                                  "data": job_object(job)}
            session.add(WebhookDelivery(tenant_id=job.tenant_id, endpoint_id=ep.id, event=event,
                                        payload=payload, next_attempt_at=time.time()))
