"""Recovery, run on a timer in every worker. Each step is a guarded UPDATE, so many reapers can
run at once:
- a running job whose heartbeat is stale lost its worker: it goes back to the queue and resumes
  from its last checkpoint; it ends `cancelled` if a cancel was asked, and `failed` after
  `max_lost_without_progress` losses in a row with no new checkpoint (a job that kills its worker);
- once the broker is found to have lost its messages (a restarted Redis without persistence),
  every queued job's recorded message is forgotten, so the relay (worker/relay.py) sends them all
  again; a healthy backlog is otherwise left alone;
- a job queued for over `lost_message_after_seconds` since its message was sent, whose message
  the broker holds neither waiting nor delivered (a worker died taking it), has it forgotten
  too, so the relay sends it one (`resend_lost_messages`);
- expired idempotency records are purged, and so, once an hour, are webhook deliveries that
  ended (delivered or given up) over a week ago.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import delete, select, update

from store.db import session_scope
from store.jobstate import JobStatus, event_values, transition
from store.models import IdempotencyRecord, Job, JobEvent, WebhookDelivery
from store.queue import BrokerWatch
from store.settings import Settings
from worker.lifecycle import latest_checkpoint_step

log = logging.getLogger(__name__)


def _end_of_stale(s, job: Job, max_lost: int) -> tuple[JobStatus, dict, str, str]:
    """What a stale running job becomes: (status, values, event message, level)."""
    if job.cancel_requested:
        return (JobStatus.CANCELLED, {}, "Worker stopped responding after a cancel request; "
                "job cancelled, its last checkpoint is kept.", "warn")
    progressed = latest_checkpoint_step(s, job.id) > (job.claimed_step or 0)
    lost = 0 if progressed else job.lost_without_progress + 1
    if lost >= max_lost:
        return (JobStatus.FAILED, {"lost_without_progress": lost, "error": {
            "code": "worker_lost", "param": None,
            "message": f"The job's worker stopped {lost} times in a row without saving a new "
                       "checkpoint; giving up (the job may be crashing its worker)."}},
            "Worker stopped responding again without progress; job failed.", "error")
    return (JobStatus.QUEUED, {"lost_without_progress": lost, "worker_id": None,
                               "enqueued_at": None, "progress": None},
            "Worker stopped responding; job re-queued to resume from its last checkpoint.", "warn")


def requeue_stale(settings: Settings) -> None:
    """running jobs with a stale heartbeat -> queued, cancelled or failed. A re-queued job has no
    recorded wake-up message, so the relay sends one at once."""
    cutoff = time.time() - settings.stale_after_seconds
    with session_scope(settings) as s:
        stale = list(s.scalars(select(Job).where(Job.status == JobStatus.RUNNING,
                                                 Job.heartbeat_at < cutoff)))
        for job in stale:
            to, values, message, level = _end_of_stale(s, job, settings.max_lost_without_progress)
            # Guarded on what we read: a worker that beat meanwhile keeps its job, and a cancel
            # asked meanwhile is seen by the next pass (re-queued, it would wait for nothing).
            transition(s, job.id, to, leaving=[JobStatus.RUNNING],
                       where=[Job.heartbeat_at == job.heartbeat_at,
                              Job.cancel_requested == job.cancel_requested],
                       values=values, message=message, level=level)


def forget_sent_messages(settings: Settings) -> None:
    """The broker lost its messages: every queued job needs its message again (the relay)."""
    with session_scope(settings) as s:
        s.execute(update(Job).where(Job.status == JobStatus.QUEUED).values(enqueued_at=None)
                  .execution_options(synchronize_session=False))


LOST_BATCH = 1000  # long-queued jobs checked per sweep, oldest first
CONFIRM_S = 1.0  # a message missing from two looks this far apart is lost, not in a consumer's hand


def sweep_every(settings: Settings) -> float:
    """How often one worker looks for lost single messages: often enough to act soon after
    `lost_message_after_seconds`, rarely enough that listing a long backlog costs nothing."""
    return min(60.0, max(1.0, settings.lost_message_after_seconds / 4))


def resend_lost_messages(settings: Settings, watch: BrokerWatch, *,
                         confirm_s: float = CONFIRM_S) -> list[str]:
    """Queued jobs whose message was sent over `lost_message_after_seconds` ago and that the
    broker no longer holds (`BrokerWatch.held`) get a new one: their sent message is forgotten,
    so the relay sends it. The jobs it did that to.

    The LOST_BATCH longest-sent are looked at: their messages are the oldest in the queue, at
    the end the broker is read from. A lost job behind more than that many waits a little more
    for its new message, but no longer than the backlog ahead of it would have held it anyway.
    A message is missing for a moment while a consumer holds it between taking it off the queue
    and recording it as delivered, so only a job missing from two looks `confirm_s` apart counts;
    a message sent twice all the same is harmless (the claim is a compare-and-set). Each write is
    guarded on the message time read, so a job claimed, cancelled or re-sent meanwhile is left
    alone."""
    if not watch.take_sweep(sweep_every(settings)):
        return []
    cutoff = time.time() - settings.lost_message_after_seconds
    with session_scope(settings) as s:
        waiting = {row.id: row for row in s.execute(
            select(Job.id, Job.tenant_id, Job.enqueued_at)
            .where(Job.status == JobStatus.QUEUED, Job.enqueued_at < cutoff)
            .order_by(Job.enqueued_at).limit(LOST_BATCH))}
    missing = set(waiting)
    for look in range(2):
        if not missing:
            return []
        if look:
            time.sleep(confirm_s)
        held = watch.held(missing, settings.lost_message_after_seconds)
        if held is None:
            return []  # the broker could not be read: the next sweep looks again
        missing -= held
    resent = []
    with session_scope(settings) as s:
        for job_id in [j for j in waiting if j in missing]:  # longest-sent first
            row = waiting[job_id]
            done = s.execute(update(Job).where(
                Job.id == job_id, Job.status == JobStatus.QUEUED,
                Job.enqueued_at == row.enqueued_at).values(enqueued_at=None)
                .execution_options(synchronize_session=False))
            if done.rowcount == 1:
                s.add(JobEvent(**event_values(
                    row, "The job's wake-up message was lost from the broker (a worker stopped "
                    "while taking it); it is sent again.", level="warn")))
                resent.append(job_id)
    if resent:
        log.warning("%d queued job(s) had lost their broker message; re-sending: %s",
                    len(resent), ", ".join(resent[:10]))
    return resent


def purge_idempotency(settings: Settings) -> None:
    with session_scope(settings) as s:
        s.execute(delete(IdempotencyRecord).where(
            IdempotencyRecord.created_at < time.time() - settings.idempotency_ttl_seconds))


DELIVERIES_KEPT_S = 7 * 24 * 3600.0  # an ended delivery's row, for looking into a complaint
PURGE_DELIVERIES_EVERY_S = 3600.0  # the purge reads the whole table: rarely
_next_delivery_purge = 0.0


def purge_webhook_deliveries(settings: Settings, *, now: float | None = None) -> int:
    """Delete deliveries that ended over DELIVERIES_KEPT_S ago (each holds its whole event):
    without this the table grew by one row per endpoint per job ending, forever."""
    global _next_delivery_purge
    now = time.time() if now is None else now
    if now < _next_delivery_purge:
        return 0
    cutoff, D = now - DELIVERIES_KEPT_S, WebhookDelivery
    with session_scope(settings) as s:
        purged = s.execute(delete(D).where((D.delivered_at < cutoff)
                                           | (D.gave_up & (D.next_attempt_at < cutoff)))
                           .execution_options(synchronize_session=False)).rowcount
    _next_delivery_purge = now + PURGE_DELIVERIES_EVERY_S  # once done: a failed one goes again
    return purged


def reap_once(settings: Settings, watch: BrokerWatch | None = None) -> None:
    requeue_stale(settings)
    if watch is not None and watch.lost_messages():
        log.warning("the broker lost its messages (restarted without persistence); re-sending "
                    "every queued job")
        try:
            forget_sent_messages(settings)
        except BaseException:
            watch.abandon()  # the next pass (here or in another worker) re-sends
            raise
        watch.resent()
    elif watch is not None:
        resend_lost_messages(settings, watch)
    purge_idempotency(settings)
    purge_webhook_deliveries(settings)


def start_reaper(settings: Settings, every_s: float = 5.0) -> threading.Thread:
    watch = BrokerWatch(settings)

    def loop():
        while True:
            try:
                reap_once(settings, watch)
            except Exception:  # noqa: BLE001 - a reaper that dies silently would be worse
                log.exception("reaper pass failed")
            time.sleep(every_s)

    thread = threading.Thread(target=loop, name="driftsafe-reaper", daemon=True)
    thread.start()
    return thread
