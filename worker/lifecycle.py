"""The worker's side of the job row: claim it, beat on it, record checkpoints, finish it once.
Every state change goes through `store.jobstate.transition` (a guarded UPDATE), so a duplicate
message, a slow worker or a reaped job can never make a job run twice or end twice."""

from __future__ import annotations

import os
import socket
import time

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.jobstate import FINISHED, JobStatus, add_event, transition  # noqa: F401 - re-exported
from store.models import Checkpoint, Job, now


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def latest_checkpoint_step(session: Session, job_id: str) -> int:
    return session.scalar(select(func.max(Checkpoint.step_number))
                          .where(Checkpoint.job_id == job_id)) or 0


def claim_job(session: Session, job_id: str, worker_id: str) -> Job | None:
    """queued -> running for exactly one caller; None when someone else has it (or it ended).
    A job with a cancel request is never started: a queued one is ended `cancelled` here, so
    that no path that leaves a cancelled job queued can leave it there for good."""
    job = transition(session, job_id, JobStatus.RUNNING, leaving=[JobStatus.QUEUED],
                     where=[Job.cancel_requested.is_(False)],
                     values={"worker_id": worker_id, "heartbeat_at": time.time(),
                             "attempts": Job.attempts + 1, "started_at": now(), "progress": None,
                             "claimed_step": latest_checkpoint_step(session, job_id)})
    if job is None:
        transition(session, job_id, JobStatus.CANCELLED, leaving=[JobStatus.QUEUED],
                   where=[Job.cancel_requested.is_(True)],
                   message="Job cancelled before it started again.")
    return job  # committed by the caller, with whatever it records of the start


def heartbeat(session: Session, job_id: str, worker_id: str,
              progress: dict | None) -> tuple[bool, bool]:
    """Stamp the heartbeat; returns (still ours, cancel requested)."""
    values: dict = {"heartbeat_at": time.time()}
    if progress is not None:
        values["progress"] = progress
        if progress.get("seconds_remaining") is not None:
            values["estimated_finish"] = int(time.time() + progress["seconds_remaining"])
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                               Job.worker_id == worker_id).values(**values))
    ours = result.rowcount == 1
    session.commit()
    return ours, cancel_requested(session, job_id)


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_checkpoint(session: Session, job: Job, step: int, storage_path: str,
                      metrics: dict) -> None:
    """One row per (job, step): a resumed job re-saving a step updates it instead of doubling.
    Saving a checkpoint is progress: the poison-pill counter starts again."""
    row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id,
                                                  Checkpoint.step_number == step))
    if row is None:
        row = Checkpoint(tenant_id=job.tenant_id, job_id=job.id, step_number=step,
                         storage_path=storage_path)
        session.add(row)
    row.metrics = metrics
    row.drift_safe = metrics.get("drift_safe")
    session.execute(update(Job).where(Job.id == job.id).values(lost_without_progress=0))


def finish_job(session: Session, job_id: str, worker_id: str, status: str, *,
               message: str | None = None, level: str = "info", **values) -> bool:
    """End the job once, with its final event and webhook deliveries, in one transaction."""
    status = JobStatus(status)
    assert status in FINISHED
    job = transition(session, job_id, status, leaving=[JobStatus.RUNNING],
                     where=[Job.worker_id == worker_id], values=values, message=message,
                     level=level)
    if job is None:
        session.rollback()  # not ours any more: the results file stays, but nothing else
        return False
    session.commit()
    return True
