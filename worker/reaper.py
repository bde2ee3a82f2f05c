"""Recovery, run on a timer in every worker: jobs whose worker died go back to the queue (they
resume from their last checkpoint), queued jobs whose message was lost are re-sent, and due
webhooks are delivered. Each step is a guarded UPDATE, so many reapers can run at once."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select, update

from store.db import session_scope
from store.models import Job, JobEvent
from store.queue import enqueue_job
from store.settings import Settings
from worker.lifecycle import MAX_ATTEMPTS
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


def requeue_stale(settings: Settings) -> list[str]:
    """running jobs with a stale heartbeat -> queued (or failed after MAX_ATTEMPTS)."""
    cutoff = time.time() - settings.stale_after_seconds
    moved = []
    with session_scope(settings) as s:
        stale = list(s.scalars(select(Job).where(Job.status == "running",
                                                 Job.heartbeat_at < cutoff)))
        for job in stale:
            out_of_tries = job.attempts >= MAX_ATTEMPTS
            values = ({"status": "failed", "finished_at": int(time.time()),
                       "error": {"code": "worker_lost", "param": None,
                                 "message": f"The job's worker stopped {job.attempts} times; "
                                            "giving up."}}
                      if out_of_tries else
                      {"status": "queued", "worker_id": None, "enqueued_at": time.time()})
            r = s.execute(update(Job).where(Job.id == job.id, Job.status == "running",
                                            Job.heartbeat_at == job.heartbeat_at).values(**values))
            if r.rowcount == 1:
                s.add(JobEvent(tenant_id=job.tenant_id, job_id=job.id, level="warn",
                               message="Worker stopped responding; " + (
                                   "job failed." if out_of_tries else
                                   "job re-queued to resume from its last checkpoint.")))
                if not out_of_tries:
                    moved.append(job.id)
    return moved


def resend_lost(settings: Settings) -> list[str]:
    """queued jobs whose wake-up message is older than requeue_after: send another."""
    cutoff = time.time() - settings.requeue_after_seconds
    with session_scope(settings) as s:
        lost = list(s.scalars(select(Job.id).where(Job.status == "queued",
                                                   Job.enqueued_at < cutoff)))
        s.execute(update(Job).where(Job.id.in_(lost), Job.status == "queued")
                  .values(enqueued_at=time.time()))
    return lost


def reap_once(settings: Settings, celery_app) -> None:
    for job_id in requeue_stale(settings) + resend_lost(settings):
        enqueue_job(celery_app, job_id)
    with session_scope(settings) as s:
        deliver_due(s)


def start_reaper(settings: Settings, celery_app, every_s: float = 5.0) -> threading.Thread:
    def loop():
        while True:
            try:
                reap_once(settings, celery_app)
            except Exception:  # noqa: BLE001 - a reaper that dies silently would be worse
                log.exception("reaper pass failed")
            time.sleep(every_s)

    thread = threading.Thread(target=loop, name="driftsafe-reaper", daemon=True)
    thread.start()
    return thread
