"""The relay: the one sender of wake-up messages, a thread in every worker.

A job needs a message when its row is queued with none recorded (`enqueued_at` empty): a new job,
a dead worker's job put back in the queue, or every queued job once the broker lost its messages.
The relay sends those messages and records them: the job rows are the outbox (the transactional
outbox pattern), so the API never talks to the broker. A creation costs only its database writes
(the API's own sends were a sixth of its creation throughput under load) and a broker outage
costs it nothing.

A pass takes up to BATCH such rows, oldest first, locked for the length of the send (FOR UPDATE
SKIP LOCKED on PostgreSQL, so the relays of several workers send different rows), sends their
messages in one pipelined round trip (`store.queue.enqueue_jobs`) and records them in the same
transaction. A relay that dies between its send and its commit leaves the rows unrecorded: they are
sent again, and the second message finds the job already claimed (the claim is a compare-and-set).
A failed send records nothing and is tried again at the next pass.

On PostgreSQL a trigger NOTIFYs whenever a row comes to need a message (migration 0004) and the
relay LISTENs, so a new job's message leaves within milliseconds; without a notification the relay
still passes every `relay_poll_seconds`, the only wake-up on SQLite.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import make_url

from store.db import session_scope
from store.jobstate import JobStatus
from store.models import Job
from store.queue import backstop_time_limit, enqueue_jobs
from store.settings import Settings

log = logging.getLogger(__name__)
BATCH = 500
CHANNEL = "driftsafe_unsent_jobs"  # migration 0004's trigger notifies here
_jobs = Job.__table__

UNSENT = (select(_jobs.c.id, _jobs.c.total_steps)
          .where(_jobs.c.status == JobStatus.QUEUED, _jobs.c.enqueued_at.is_(None))
          .order_by(_jobs.c.seq).limit(bindparam("batch")).with_for_update(skip_locked=True))


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


class _Notifications:
    """Waits for the trigger's notifications on PostgreSQL; elsewhere only sleeps."""

    def __init__(self, settings: Settings):
        url = make_url(settings.sqlalchemy_url)
        self.dsn = (url.set(drivername="postgresql").render_as_string(hide_password=False)
                    if url.get_backend_name() == "postgresql" else None)
        self.conn = None

    def wait(self, timeout: float, stop: threading.Event) -> None:
        if self.dsn is None:
            stop.wait(timeout)
            return
        import psycopg

        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                self.conn.execute(f"LISTEN {CHANNEL}")
            for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                pass
        except Exception:  # noqa: BLE001 - a database restart: poll until it is back
            log.warning("relay: listening for unsent jobs failed; polling", exc_info=True)
            self.close()
            stop.wait(timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def start_relay(settings: Settings, celery_app,
                stop: threading.Event | None = None) -> threading.Thread:
    stop = stop or threading.Event()
    notifications = _Notifications(settings)

    def loop():
        notifications.wait(0, stop)  # listening before the first pass: none slips between
        while not stop.is_set():
            try:
                while relay_once(settings, celery_app) == BATCH:
                    pass  # more waiting: go on at once
            except Exception:  # noqa: BLE001 - a relay that dies silently would strand jobs
                log.exception("relay pass failed")
            notifications.wait(settings.relay_poll_seconds, stop)
        notifications.close()

    thread = threading.Thread(target=loop, name="driftsafe-relay", daemon=True)
    thread.start()
    return thread
