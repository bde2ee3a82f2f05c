"""The relay: the one sender of wake-up messages, a thread in every worker.

A job needs a message when its row is queued with none recorded (`enqueued_at` empty): a new job,
a dead worker's job put back in the queue, or every queued job once the broker lost its messages.
The relay sends those messages and records them: the job rows are the outbox (the transactional
outbox pattern), so the API never talks to the broker. A creation costs only its database writes
(the API's own sends were a sixth of its creation throughput under load) and a broker outage
costs it nothing.

Every `relay_poll_seconds` a pass takes up to BATCH such rows, oldest first, locked for the length
of the send (FOR UPDATE SKIP LOCKED on PostgreSQL, so the relays of several workers send different
rows), sends their messages in one pipelined round trip (`store.queue.enqueue_jobs`) and records
them in the same transaction. A relay that dies between its send and its commit leaves the rows
unrecorded: they are sent again, and the second message finds the job already claimed (the claim
is a compare-and-set). A failed send records nothing and is tried again at the next pass.

The rows are found through a partial index of exactly them (`ix_jobs_unsent`), so a pass costs
the same however long the backlog. The relay polls rather than waiting on a PostgreSQL NOTIFY
from a trigger: a transaction that notifies takes a database-wide lock at commit, which
serialised every job creation's commit behind the one before (creation p99 250-270 ms with the
trigger against 204 without, one bench run each); a second is nothing next to a training job.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Integer, bindparam, select, update

from store.db import session_scope
from store.jobstate import JobStatus
from store.models import Job
from store.queue import backstop_time_limit, enqueue_jobs
from store.settings import Settings

log = logging.getLogger(__name__)
BATCH = 500
_jobs = Job.__table__

# The status is written into the SQL, not bound: a planner that sees only a parameter cannot
# prove that the partial index `ix_jobs_unsent` (store.jobstate.UNSENT_MESSAGE) covers the query.
UNSENT = (select(_jobs.c.id, _jobs.c.total_steps)
          .where(_jobs.c.status == bindparam("status", JobStatus.QUEUED.value,
                                             literal_execute=True),
                 _jobs.c.enqueued_at.is_(None))
          .order_by(_jobs.c.seq).limit(bindparam("batch", type_=Integer))
          .with_for_update(skip_locked=True))


def relay_once(settings: Settings, celery_app, batch: int = BATCH) -> int:
    """Send and record up to `batch` unsent jobs' messages; how many were sent."""
    with session_scope(settings) as s:
        rows = s.connection().execute(UNSENT, {"batch": batch}).all()
        if not rows:
            return 0
        if not enqueue_jobs(celery_app, [(row.id, backstop_time_limit(settings, row.total_steps))
                                         for row in rows]):
            return 0  # nothing recorded: the next pass sends them again
        s.connection().execute(update(_jobs).where(_jobs.c.id.in_([row.id for row in rows]))
                               .values(enqueued_at=time.time()))
    return len(rows)


def start_relay(settings: Settings, celery_app,
                stop: threading.Event | None = None) -> threading.Thread:
    stop = stop or threading.Event()

    def loop():
        while not stop.is_set():
            try:
                while relay_once(settings, celery_app) == BATCH:
                    pass  # more waiting: go on at once
            except Exception:  # noqa: BLE001 - a relay that dies silently would strand jobs
                log.exception("relay pass failed")
            stop.wait(settings.relay_poll_seconds)

    thread = threading.Thread(target=loop, name="driftsafe-relay", daemon=True)
    thread.start()
    return thread
