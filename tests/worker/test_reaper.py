"""The reaper and the relay on a real store and the filesystem broker: what the reaper re-queues,
ends and leaves alone, what the relay sends, and the job state transitions they share with the
API and the worker."""

import time

import pytest

from store.db import migrate, session_scope
from store.models import Checkpoint, Job, JobEvent, Tenant, WebhookDelivery, WebhookEndpoint
from store.queue import BrokerWatch, make_celery
from store.settings import Settings
from worker.lifecycle import claim_job, finish_job
from worker.reaper import reap_once, resend_lost_messages
from worker.relay import relay_once


def setup(tmp_path, **overrides):
    settings = Settings(data_dir=tmp_path, secret_key="x", stale_after_seconds=30, **overrides)
    migrate(settings)
    with session_scope(settings) as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        s.add(WebhookEndpoint(tenant_id=tenant.id, url="https://example.com/h", secret="s",
                              events=["fine_tuning.job.failed", "fine_tuning.job.cancelled"]))
    return settings


def add_job(settings, checkpoint_steps=(), **values) -> str:
    with session_scope(settings) as s:
        tenant = s.query(Tenant).one()
        job = Job(tenant_id=tenant.id, model="m", training_file="f",
                  spec={"method": {"type": "supervised"}, "adapter": {}, "evaluation": {},
                        "seed": 1}, **values)
        s.add(job)
        s.flush()
        for step in checkpoint_steps:
            s.add(Checkpoint(tenant_id=tenant.id, job_id=job.id, step_number=step,
                             storage_path=f"x/{step}"))
        return job.id


class Messages(list):
    """The folder broker's messages, one text each; `count(job_id)`: how many name that job."""

    def count(self, job_id: str) -> int:
        return sum(job_id in m for m in self)

    def __contains__(self, job_id: str) -> bool:
        return self.count(job_id) > 0


def messages(settings) -> Messages:
    return Messages(p.read_text() for p in (settings.broker_folder / "queue").iterdir())


def test_stale_jobs_resume_fail_only_without_progress_and_honour_cancel(tmp_path):
    settings = setup(tmp_path, max_lost_without_progress=3)
    now = time.time()
    stale = dict(status="running", heartbeat_at=now - 100, worker_id="w")
    dead = add_job(settings, attempts=1, **stale)
    alive = add_job(settings, status="running", heartbeat_at=now, attempts=1, worker_id="w")
    # Lost three times with a new checkpoint each time (a preemptible GPU): it carries on.
    progressing = add_job(settings, attempts=9, lost_without_progress=0, claimed_step=40,
                          checkpoint_steps=[40, 50], **stale)
    # Lost twice already without a checkpoint since its claim: the third loss ends it.
    poison = add_job(settings, attempts=3, lost_without_progress=2, claimed_step=10,
                     checkpoint_steps=[10], **stale)
    cancelling = add_job(settings, attempts=1, cancel_requested=True, **stale)
    reap_once(settings)
    relay_once(settings, make_celery(settings))
    with session_scope(settings) as s:
        jobs = {j.id: j for j in s.query(Job)}
        events = [e.message for e in s.query(JobEvent).filter_by(job_id=dead)]
        hooks = {d.payload["data"]["id"]: d.event for d in s.query(WebhookDelivery)}
    assert {k: j.status for k, j in jobs.items()} == {
        dead: "queued", alive: "running", progressing: "queued", poison: "failed",
        cancelling: "cancelled"}
    assert jobs[dead].lost_without_progress == 1 and jobs[progressing].lost_without_progress == 0
    assert any("re-queued" in m for m in events)
    assert jobs[poison].error["code"] == "worker_lost"
    # Jobs the reaper ends send their webhooks, like every other ending.
    assert hooks == {poison: "fine_tuning.job.failed", cancelling: "fine_tuning.job.cancelled"}
    sent = messages(settings)
    assert dead in sent and progressing in sent
    assert alive not in sent and poison not in sent and cancelling not in sent


def test_the_relay_sends_unsent_jobs_once_and_leaves_a_healthy_backlog_alone(tmp_path):
    settings = setup(tmp_path)
    now = time.time()
    # Committed a moment ago, or by an API that died at once: no message recorded yet.
    unsent = add_job(settings, status="queued", enqueued_at=None, created_at=int(now))
    # A job waiting its turn for an hour, its message in the broker: nothing to do.
    backlog = add_job(settings, status="queued", enqueued_at=now - 3600,
                      created_at=int(now) - 3600)
    running = add_job(settings, status="running", enqueued_at=None, heartbeat_at=now)
    celery = make_celery(settings)
    assert relay_once(settings, celery) == 1
    assert relay_once(settings, celery) == 0
    sent = messages(settings)
    assert sent.count(unsent) == 1  # sent once, then recorded as sent
    assert backlog not in sent and running not in sent
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(id=unsent).one().enqueued_at is not None


def test_a_failed_send_records_nothing_and_the_next_pass_sends(tmp_path):
    settings = setup(tmp_path)
    job = add_job(settings, status="queued", enqueued_at=None)

    class DownBroker:
        def producer_or_acquire(self, *a, **kw):  # where every send starts
            raise ConnectionError("broker down")

    assert relay_once(settings, DownBroker()) == 0
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(id=job).one().enqueued_at is None
    assert relay_once(settings, make_celery(settings)) == 1
    assert messages(settings).count(job) == 1


def test_a_broker_that_lost_its_messages_gets_every_queued_job_again(tmp_path):
    settings = setup(tmp_path)
    backlog = [add_job(settings, status="queued", enqueued_at=time.time() - 60)
               for _ in range(3)]
    done = add_job(settings, status="succeeded", enqueued_at=time.time() - 60)

    class LostEverything:
        resent = abandon = staticmethod(lambda: None)

        def lost_messages(self):
            return True

    reap_once(settings, LostEverything())
    assert relay_once(settings, make_celery(settings)) == 3
    sent = messages(settings)
    assert all(sent.count(j) == 1 for j in backlog) and done not in sent


def test_broker_epoch_notices_a_redis_that_lost_its_messages():
    import redis

    url = "redis://127.0.0.1:6379/11"
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = Settings(broker_url=url, secret_key="x")
    first, second = BrokerWatch(settings), BrokerWatch(settings)
    assert first.lost_messages() is True  # an empty broker: whatever was queued is not in it
    assert second.lost_messages() is False  # one worker re-sends, not every worker
    assert first.lost_messages() is False
    first.resent()
    assert second.lost_messages() is False  # the marker is back
    assert first.lost_messages() is False
    r.flushdb()  # what a restart without persistence looks like
    assert [second.lost_messages(), first.lost_messages()] == [True, False]


def test_a_resend_that_failed_on_the_way_is_done_by_the_next_pass(tmp_path, monkeypatch):
    """The worker that noticed the lost broker could not mark the queued jobs for re-sending
    (the database was down): it used to have set the marker anyway, so no worker ever
    re-sent, and the queued jobs waited for messages that were gone."""
    import redis
    from sqlalchemy.exc import OperationalError

    import worker.reaper as reaper

    url = "redis://127.0.0.1:6379/11"
    redis.Redis.from_url(url).flushdb()
    settings = setup(tmp_path, broker_url=url)
    job_id = add_job(settings, status="queued", enqueued_at=time.time() - 60)
    first, second = BrokerWatch(settings), BrokerWatch(settings)

    def database_down(_settings):
        raise OperationalError("UPDATE jobs", {}, ConnectionError("server closed"))

    with monkeypatch.context() as m:
        m.setattr(reaper, "forget_sent_messages", database_down)
        with pytest.raises(OperationalError):
            reap_once(settings, first)
    reap_once(settings, second)
    with session_scope(settings) as s:
        assert s.query(Job).filter_by(id=job_id).one().enqueued_at is None  # to be re-sent
    assert first.lost_messages() is False and second.lost_messages() is False


def test_claim_and_finish_happen_once(tmp_path):
    settings = setup(tmp_path)
    job_id = add_job(settings, status="queued")
    with session_scope(settings) as s:
        assert claim_job(s, job_id, "a") is not None
    with session_scope(settings) as s:
        assert claim_job(s, job_id, "b") is None  # a duplicate message does nothing
    with session_scope(settings) as s:
        assert not finish_job(s, job_id, "b", "succeeded")  # not b's job
    with session_scope(settings) as s:
        assert finish_job(s, job_id, "a", "succeeded", message="done")
    with session_scope(settings) as s:
        assert not finish_job(s, job_id, "a", "failed")  # it already ended
        assert s.query(Job).one().status == "succeeded"
        assert [e.message for e in s.query(JobEvent)] == ["done"]


def test_a_job_with_a_cancel_request_is_never_claimed_and_ends_cancelled(tmp_path):
    settings = setup(tmp_path)
    job_id = add_job(settings, status="queued", cancel_requested=True)
    with session_scope(settings) as s:
        assert claim_job(s, job_id, "a") is None
    with session_scope(settings) as s:  # ended, with its webhook, not left queued for good
        assert s.query(Job).one().status == "cancelled"
        assert [d.event for d in s.query(WebhookDelivery)] == ["fine_tuning.job.cancelled"]


def test_a_cancel_asked_while_the_reaper_decides_is_not_requeued(tmp_path, monkeypatch):
    """The reaper reads a stale job with no cancel request; the API flags it before the reaper
    writes. Re-queued with its flag, the job would never be claimed nor ended: the reaper's write
    must see the flag and leave the job for its next pass, which cancels it."""
    import worker.reaper as reaper

    settings = setup(tmp_path)
    job_id = add_job(settings, status="running", heartbeat_at=time.time() - 100, worker_id="w",
                     attempts=1)
    decide = reaper._end_of_stale

    def cancel_meanwhile(s, job, max_lost):
        outcome = decide(s, job, max_lost)
        with session_scope(settings) as other:
            other.query(Job).filter_by(id=job_id).update({"cancel_requested": True})
        return outcome

    monkeypatch.setattr(reaper, "_end_of_stale", cancel_meanwhile)
    reap_once(settings)
    with session_scope(settings) as s:
        assert s.query(Job).one().status == "running"
    monkeypatch.setattr(reaper, "_end_of_stale", decide)
    reap_once(settings)
    with session_scope(settings) as s:
        assert s.query(Job).one().status == "cancelled"


@pytest.mark.parametrize("status", ["queued", "running"])
def test_status_strings_live_in_one_place(status):
    from store.jobstate import ACTIVE, FINISHED, JobStatus

    assert JobStatus(status) in ACTIVE and not ACTIVE & FINISHED
    assert {s.value for s in ACTIVE | FINISHED} == {s.value for s in JobStatus}


def test_wake_ups_go_to_redis_together_as_messages_a_worker_reads(monkeypatch):
    """A batch of wake-ups is one pipelined round trip, and each is a whole Celery message for
    its job, with the job's time limits; an unreachable broker sends none and says so."""
    import base64
    import json

    import redis
    from redis.client import Pipeline

    from store.queue import QUEUE, RUN_JOB, enqueue_jobs

    url = "redis://127.0.0.1:6379/12"
    r = redis.Redis.from_url(url)
    r.flushdb()
    executed = []
    real_execute = Pipeline.execute

    def execute(self, *a, **kw):
        executed.append(len(self.command_stack))
        return real_execute(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "execute", execute)
    celery = make_celery(Settings(broker_url=url, secret_key="x"))
    jobs = [(f"ftjob-{i}", 100.0 + i) for i in range(40)]
    try:
        assert enqueue_jobs(celery, [("ftjob-first", None)]) is True  # declares the queue too
        executed.clear()
        assert enqueue_jobs(celery, jobs) is True
        assert executed == [40]  # one round trip for the forty
        found = {}
        for raw in r.lrange(QUEUE, 0, -2):  # the first job's message is the oldest: last
            msg = json.loads(raw)
            assert msg["headers"]["task"] == RUN_JOB
            (job_id,), _, _ = json.loads(base64.b64decode(msg["body"]))
            found[job_id] = msg["headers"]["timelimit"]
            assert msg["headers"]["argsrepr"] == repr([job_id])  # what `celery inspect` shows
        assert found == {j: [t, t * 0.98] for j, t in jobs}
    finally:
        r.flushdb()
    down = make_celery(Settings(broker_url="redis://127.0.0.1:1/0", secret_key="x"))
    assert enqueue_jobs(down, jobs[:3]) is False


def _backdate(settings, job_ids, seconds: float) -> dict[str, float]:
    with session_scope(settings) as s:
        for job in s.query(Job).filter(Job.id.in_(job_ids)):
            job.enqueued_at -= seconds
    with session_scope(settings) as s:
        return {j.id: j.enqueued_at for j in s.query(Job).filter(Job.id.in_(job_ids))}


def _sent_at(settings) -> dict[str, float | None]:
    with session_scope(settings) as s:
        return {j.id: j.enqueued_at for j in s.query(Job)}


def _broker(tmp_path, lost_after: float = 60):
    """A private Redis database with the broker's marker set (a broker running a while), the
    store, its Celery app and a watch."""
    import redis

    from store.queue import EPOCH_KEY

    url = "redis://127.0.0.1:6379/11"
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.set(EPOCH_KEY, b"before")
    settings = setup(tmp_path, broker_url=url, lost_message_after_seconds=lost_after)
    return r, settings, make_celery(settings), BrokerWatch(settings)


def test_only_a_long_queued_job_whose_message_the_broker_lost_is_sent_again(tmp_path):
    """Jobs whose messages were sent long ago: one waiting in the queue (a backlog), one
    delivered to a worker and not yet acknowledged, one delivered long ago to a worker that
    died before its claim, one lost (taken off the queue by a consumer that died before
    recording it); and one lost a moment ago. The two long-lost ones are sent again, with an
    event saying why; nothing else changes."""
    from store.queue import QUEUE, SWEEP_KEY, job_of_message

    r, settings, app, watch = _broker(tmp_path)
    # Workers take two messages and hold them, unacked (until their connection closes: kombu
    # then puts them back in the queue).
    delivered, delivered_to_the_dead = add_job(settings, status="queued"), None
    consumers = []
    for _ in range(2):
        if consumers:
            delivered_to_the_dead = add_job(settings, status="queued")
        assert relay_once(settings, app) == 1
        consumers.append(app.connection())
        assert consumers[-1].default_channel.basic_get(QUEUE, no_ack=False) is not None
    # the second was delivered 120 s ago, as far as kombu's delivery index says
    tag = r.zrange("unacked_index", 0, -1, withscores=True)
    newest_tag = max(tag, key=lambda t: t[1])[0]
    r.zadd("unacked_index", {newest_tag: time.time() - 120})
    waiting, lost, lost_lately = (add_job(settings, status="queued") for _ in range(3))
    assert relay_once(settings, app) == 3
    sent = _backdate(settings, [waiting, delivered, delivered_to_the_dead, lost], 180)
    for raw in r.lrange(QUEUE, 0, -1):  # `lost` and `lost_lately`: popped by a dying consumer
        if job_of_message(raw) in (lost, lost_lately):
            r.lrem(QUEUE, 1, raw)
    assert [job_of_message(raw) for raw in r.lrange(QUEUE, 0, -1)] == [waiting]
    assert r.hlen("unacked") == 2
    everyone = {waiting, delivered, delivered_to_the_dead, lost, lost_lately}
    assert watch.held(everyone, 60) == {waiting, delivered}

    assert resend_lost_messages(settings, watch, confirm_s=0) == [delivered_to_the_dead, lost]
    now = _sent_at(settings)
    with session_scope(settings) as s:
        events = {j: [e.message for e in s.query(JobEvent).filter_by(job_id=j)]
                  for j in everyone}
    assert now[lost] is None and now[delivered_to_the_dead] is None  # the relay sends them
    assert (now[waiting], now[delivered]) == (sent[waiting], sent[delivered])
    assert now[lost_lately] is not None
    for job_id in everyone:
        resent = job_id in (lost, delivered_to_the_dead)
        assert len(events[job_id]) == resent, (job_id, events[job_id])
        assert not resent or "lost from the broker" in events[job_id][0]
    assert relay_once(settings, app) == 2 and watch.held(everyone, 60) == everyone - {
        lost_lately}

    # One sweep per interval across workers: another lost job waits for the next.
    again = _backdate(settings, [lost_lately], 120)
    assert resend_lost_messages(settings, BrokerWatch(settings), confirm_s=0) == []
    assert _sent_at(settings)[lost_lately] == again[lost_lately]
    r.delete(SWEEP_KEY)
    assert resend_lost_messages(settings, watch, confirm_s=0) == [lost_lately]
    for consumer in consumers:
        consumer.close()


def test_the_sweep_reads_a_long_backlog_from_its_oldest_end_and_stops_when_all_are_found(
        tmp_path, monkeypatch):
    """2,500 messages waiting: the lost-message sweep finds the 3 oldest jobs in one read of
    the queue's oldest end; a missing one makes it read the whole queue, in overlapping pages
    (a consumer popping the oldest meanwhile must not make it step over a message)."""
    import store.queue as queue

    r, settings, app, watch = _broker(tmp_path)
    jobs = [add_job(settings, status="queued") for _ in range(2500)]
    assert relay_once(settings, app, batch=2500) == 2500
    reads = []
    real = watch.client.lrange
    monkeypatch.setattr(watch.client, "lrange", lambda *a: reads.append(a[1:]) or real(*a))
    assert watch.held(set(jobs[:3]), 60) == set(jobs[:3])
    assert reads == [(-queue.SCAN_CHUNK, -1)]
    reads.clear()
    assert watch.held({jobs[0], "ftjob-gone"}, 60) == {jobs[0]}
    # three pages of the queue, each overlapping the one before, then one empty read of each
    # priority's list (kombu's keys for priorities 3, 6 and 9)
    step = queue.SCAN_CHUNK - queue.SCAN_OVERLAP
    assert reads == [(-queue.SCAN_CHUNK - k * step, -1 - k * step) for k in range(3)] + [
        (-queue.SCAN_CHUNK, -1)] * 3


def test_a_message_back_by_the_second_look_is_not_lost(tmp_path, monkeypatch):
    """Between a consumer taking a message off the queue and recording it as delivered, the
    broker holds it nowhere: a job is lost only if missing from two looks. A broker that
    cannot be read in the middle of a sweep changes nothing either."""
    _r, settings, _app, watch = _broker(tmp_path)
    job_id = add_job(settings, status="queued", enqueued_at=time.time() - 120)
    for looks in ([set(), {job_id}], [set(), None], [None]):
        answers = iter(looks)
        monkeypatch.setattr(watch, "held", lambda jobs, within, answers=answers: next(answers))
        watch.client.delete("driftsafe:sweeping")
        assert resend_lost_messages(settings, watch, confirm_s=0) == []
        assert _sent_at(settings)[job_id] is not None


def test_no_sweep_while_the_broker_is_new_or_holds_a_message_it_cannot_read(tmp_path):
    """An emptied broker makes every queued job look lost: that is the marker's re-send, not
    the sweep's. A message of ours in a form the sweep cannot read stops it rather than count
    the job lost (or read the message any other way than as JSON)."""
    import json
    import pickle

    from store.queue import EPOCH_KEY, QUEUE, RUN_JOB, SWEEP_KEY

    r, settings, _app, watch = _broker(tmp_path)
    job_id = add_job(settings, status="queued", enqueued_at=time.time() - 120)
    r.delete(EPOCH_KEY)
    assert resend_lost_messages(settings, watch, confirm_s=0) == []
    r.set(EPOCH_KEY, b"again")
    r.lpush(QUEUE, json.dumps({"headers": {"task": RUN_JOB}, "body": pickle.dumps(
        [[job_id], {}, {}]).hex(), "content-type": "application/x-python-serialize"}))
    assert resend_lost_messages(settings, watch, confirm_s=0) == []
    assert _sent_at(settings)[job_id] is not None
    r.delete(QUEUE, SWEEP_KEY)  # the unreadable message gone: the job is lost
    assert resend_lost_messages(settings, watch, confirm_s=0) == [job_id]


def test_messages_are_read_as_json_only_and_other_tasks_are_not_jobs():
    import base64
    import json
    import pickle

    from store.queue import RUN_JOB, UnreadableMessage, job_of_message

    body = base64.b64encode(json.dumps([["ftjob-1"], {}, {}]).encode()).decode()
    ours = {"headers": {"task": RUN_JOB}, "content-type": "application/json", "body": body,
            "properties": {"body_encoding": "base64"}}
    assert job_of_message(json.dumps(ours)) == "ftjob-1"
    assert job_of_message({**ours, "headers": {"task": "other.task"}}) is None
    pickled = base64.b64encode(pickle.dumps([["ftjob-1"], {}, {}])).decode()
    for unreadable in ({**ours, "content-type": "application/x-python-serialize",
                        "body": pickled},
                       {**ours, "body": pickled},  # not JSON: not read
                       {**ours, "headers": {"task": RUN_JOB, "compression": "gzip"}},
                       {**ours, "body": "W10="},  # []
                       b"not json"):
        with pytest.raises(UnreadableMessage):
            job_of_message(unreadable)


def test_no_sweep_without_a_redis_broker_or_when_it_is_down(tmp_path):
    from tests.live import free_port

    settings = setup(tmp_path)  # the folder broker keeps its messages
    job_id = add_job(settings, status="queued", enqueued_at=time.time() - 10_000)
    assert resend_lost_messages(settings, BrokerWatch(settings), confirm_s=0) == []
    down = Settings(data_dir=tmp_path, secret_key="x",
                    broker_url=f"redis://127.0.0.1:{free_port()}/0")
    assert resend_lost_messages(down, BrokerWatch(down), confirm_s=0) == []
    assert _sent_at(settings)[job_id] is not None
