"""The job queue: one Celery app definition shared by the API (which only sends) and the worker.

The message carries a job id and nothing else; the job row is the truth, the message only wakes a
worker. With no broker configured, the broker is a folder under the data dir (kombu's filesystem
transport), so a laptop needs no server.
"""

from __future__ import annotations

import logging

from celery import Celery

from store.settings import Settings

RUN_JOB = "driftsafe.run_job"
QUEUE = "driftsafe.jobs"
# Redis re-delivers an unacknowledged message after its visibility timeout. Jobs acknowledge late
# (on finish), so the timeout must outlast the longest job; the row's compare-and-set claim makes
# any re-delivery harmless anyway.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    app = Celery("driftsafe", broker=settings.celery_broker_url)
    options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if settings.celery_broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        options.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                       processed_folder=str(folder / "processed"), store_processed=False)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_serializer="json",
        accept_content=["json"],  # never unpickle a message
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def enqueue_job(app: Celery, job_id: str) -> bool:
    """Send the wake-up message; False if the broker is unreachable (the reaper re-sends)."""
    try:
        app.send_task(RUN_JOB, args=[job_id], queue=QUEUE, retry=False)
        return True
    except Exception:  # noqa: BLE001 - any broker failure leaves the queued row for the reaper
        log.warning("could not enqueue job %s; it stays queued for the reaper", job_id,
                    exc_info=True)
        return False
