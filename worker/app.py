"""The Celery app of the worker: one task, `driftsafe.run_job`; its policy is store/queue.py's.

Policy: late acknowledgement (a message is acked only after its job ends, so a worker that dies
mid-job does not lose it), one task reserved at a time, one job per process at a time, and a
fresh pool process per job (`worker_max_tasks_per_child=1`): the parent process never imports
torch, so CUDA is only ever initialised in the child that trains.
"""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import worker_ready

from store.queue import RUN_JOB, make_celery
from store.settings import get_settings

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
app.conf.update(worker_max_tasks_per_child=1, worker_hijack_root_logger=False)


class RunJobTask(Task):
    # Acknowledgement and redelivery policy is the app's (store/queue.py), in one place. The time
    # limit is per job: each message carries one made from the job's steps (the runner stops the
    # job at a checkpoint before it; Celery's hard limit is the backstop for a hung step).
    max_retries = None  # only a claim the database never answered retries, for as long as it takes
    ignore_result = True


CLAIM_RETRY_S = 30  # after a database outage outlasted the claim's own retries


@app.task(name=RUN_JOB, base=RunJobTask, bind=True)
def run_job_task(self, job_id: str) -> str | None:
    from worker.lifecycle import worker_identity
    from worker.runner import ClaimUnavailable, run_job

    try:
        status = run_job(settings, job_id, worker_identity())
    except ClaimUnavailable as e:
        # A copy of this message goes back to the broker before this one is acknowledged: the
        # job stays queued with its message recorded as sent, so nothing else would send one.
        raise self.retry(exc=e, countdown=CLAIM_RETRY_S) from e
    log.info("job %s: %s", job_id, status or "not claimed (duplicate or taken)")
    return status


@worker_ready.connect
def _start_background_threads(sender=None, **_kw) -> None:
    from worker.reaper import start_reaper
    from worker.relay import start_relay
    from worker.webhooks import start_sender

    # `serve worker` migrated the schema before starting Celery. Three threads, so that a slow
    # webhook endpoint never delays a job's message or requeueing a dead worker's job.
    start_relay(settings, app)
    start_reaper(settings)
    start_sender(settings)
