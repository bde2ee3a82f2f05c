"""The reaper on a real store and the filesystem broker: what it re-queues, re-sends and fails."""

import time

from store.db import migrate, session_scope
from store.models import Job, JobEvent, Tenant
from store.queue import make_celery
from store.settings import Settings
from worker.lifecycle import claim_job, finish_job
from worker.reaper import reap_once


def setup(tmp_path):
    settings = Settings(data_dir=tmp_path, secret_key="x", stale_after_seconds=30,
                        requeue_after_seconds=60)
    migrate(settings)
    with session_scope(settings) as s:
        s.add(Tenant(name="t"))
    return settings


def add_job(settings, **values) -> str:
    with session_scope(settings) as s:
        tenant = s.query(Tenant).one()
        job = Job(tenant_id=tenant.id, model="m", training_file="f", spec={}, **values)
        s.add(job)
        s.flush()
        return job.id


def messages(settings) -> str:
    return "".join(p.read_text() for p in (settings.broker_folder / "queue").iterdir())


def test_reaper_requeues_dead_workers_jobs_and_resends_lost_messages(tmp_path):
    settings = setup(tmp_path)
    now = time.time()
    dead = add_job(settings, status="running", heartbeat_at=now - 100, attempts=1, worker_id="w")
    alive = add_job(settings, status="running", heartbeat_at=now, attempts=1, worker_id="w")
    spent = add_job(settings, status="running", heartbeat_at=now - 100, attempts=3, worker_id="w")
    lost = add_job(settings, status="queued", enqueued_at=now - 100)
    fresh = add_job(settings, status="queued", enqueued_at=now)
    reap_once(settings, make_celery(settings))
    with session_scope(settings) as s:
        status = {j.id: j.status for j in s.query(Job)}
        events = [e.message for e in s.query(JobEvent).filter_by(job_id=dead)]
        error = s.query(Job).filter_by(id=spent).one().error
    assert status == {dead: "queued", alive: "running", spent: "failed", lost: "queued",
                      fresh: "queued"}
    assert any("re-queued" in m for m in events)
    assert error["code"] == "worker_lost"
    sent = messages(settings)
    assert dead in sent and lost in sent
    assert alive not in sent and fresh not in sent and spent not in sent


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
        assert finish_job(s, job_id, "a", "succeeded")
    with session_scope(settings) as s:
        assert not finish_job(s, job_id, "a", "failed")  # it already ended
        assert s.query(Job).one().status == "succeeded"
