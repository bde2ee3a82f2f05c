"""The job row is the truth. Every state change here is a guarded UPDATE, so a duplicate message,
a slow worker or a reaped job can never make a job run twice or end twice.

  queued  --claim (CAS)-->  running  --finish (CAS on worker_id)-->  succeeded | failed | cancelled
  running --reap (stale heartbeat)--> queued   (resumes from its last checkpoint)
"""

from __future__ import annotations

import os
import socket
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import (Checkpoint, Job, JobEvent, WebhookDelivery, WebhookEndpoint, by_public_id,
                          now)

FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_job(session: Session, job_id: str, worker_id: str) -> Job | None:
    """queued -> running for exactly one caller; None when someone else has it (or it ended)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="running", worker_id=worker_id, heartbeat_at=time.time(),
                attempts=Job.attempts + 1, started_at=now(), progress=None))
    claimed = result.rowcount == 1  # read before commit: the cursor is gone afterwards
    session.commit()
    if not claimed:
        return None
    return by_public_id(session, Job, job_id)


def heartbeat(session: Session, job_id: str, worker_id: str, progress: dict | None) -> tuple[bool, bool]:
    """Stamp the heartbeat; returns (still ours, cancel requested)."""
    values: dict = {"heartbeat_at": time.time()}
    if progress is not None:
        values["progress"] = progress
        if progress.get("seconds_remaining") is not None:
            values["estimated_finish"] = int(time.time() + progress["seconds_remaining"])
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                               Job.worker_id == worker_id).values(**values))
    ours = result.rowcount == 1
    session.commit()
    return ours, cancel_requested(session, job_id)


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def add_event(session: Session, job: Job, message: str, *, level: str = "info",
              type: str = "message", data: dict | None = None) -> None:
    session.add(JobEvent(tenant_id=job.tenant_id, job_id=job.id, level=level, message=message,
                         type=type, data=data))


def record_checkpoint(session: Session, job: Job, step: int, storage_path: str,
                      metrics: dict) -> None:
    """One row per (job, step): a resumed job re-saving a step updates it instead of doubling."""
    row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id,
                                                  Checkpoint.step_number == step))
    if row is None:
        row = Checkpoint(tenant_id=job.tenant_id, job_id=job.id, step_number=step,
                         storage_path=storage_path)
        session.add(row)
    row.metrics = metrics
    row.drift_safe = metrics.get("drift_safe")


def finish_job(session: Session, job_id: str, worker_id: str, status: str, **values) -> bool:
    """End the job once, in one transaction with its final event and webhook deliveries."""
    assert status in FINISHED
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker_id == worker_id)
        .values(status=status, finished_at=now(), heartbeat_at=None, **values))
    if result.rowcount != 1:
        session.rollback()  # not ours any more: the results file stays, but nothing else
        return False
    job = by_public_id(session, Job, job_id)
    session.refresh(job)
    enqueue_webhooks(session, job)
    session.commit()
    return True


def enqueue_webhooks(session: Session, job: Job) -> None:
    """Deliveries are rows, sent later by the reaper loop: a slow endpoint never holds a job."""
    from api.schemas import job_object  # torch-free; the payload is the public job object

    event = f"fine_tuning.job.{job.status}"
    endpoints = session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.disabled.is_(False)))
    for ep in endpoints:
        if event in (ep.events or []):
            session.add(WebhookDelivery(tenant_id=job.tenant_id, endpoint_id=ep.id, event=event,
                                        payload={"object": "event", "type": event,
                                                 "created_at": now(), "data": job_object(job)}))
