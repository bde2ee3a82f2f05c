"""The relay on PostgreSQL and Redis, as workers run it: relays in several workers send each job's
message once, and a pass reads only the unsent jobs however long the backlog."""

from __future__ import annotations

import json
import secrets
import threading
import time

import psycopg
import pytest
import redis

from store.db import migrate, session_factory, session_scope
from store.models import Job, Tenant
from store.queue import QUEUE, make_celery
from store.settings import Settings
from worker import relay

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def pg_settings(tmp_path):
    name = f"driftsafe_relay_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    settings = Settings(data_dir=tmp_path, secret_key="x", broker_url=REDIS_URL,
                        database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    migrate(settings)
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    yield settings
    broker.flushdb()
    session_factory(settings).kw["bind"].dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_queued_jobs(settings: Settings, n: int) -> list[str]:
    with session_scope(settings) as s:
        tenant = s.query(Tenant).first() or Tenant(name="t")
        s.add(tenant)
        s.flush()
        jobs = [Job(tenant_id=tenant.id, model="m", training_file="f", spec={}, status="queued")
                for _ in range(n)]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def sent_job_ids() -> list[str]:
    import base64

    out = []
    for raw in redis.Redis.from_url(REDIS_URL).lrange(QUEUE, 0, -1):
        (job_id,), _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        out.append(job_id)
    return out


def test_relays_in_four_workers_send_each_message_once(pg_settings, monkeypatch):
    """Four relays at once, each send slowed down so that they overlap: without the rows locked
    for the length of a send (FOR UPDATE SKIP LOCKED) they would send the same jobs."""
    jobs = add_queued_jobs(pg_settings, 60)
    real_enqueue = relay.enqueue_jobs

    def slow_enqueue(app, batch):
        time.sleep(0.2)  # the rows stay locked meanwhile
        return real_enqueue(app, batch)

    monkeypatch.setattr(relay, "enqueue_jobs", slow_enqueue)
    celery = make_celery(pg_settings)
    passes: list[int] = []

    def run():
        while (n := relay.relay_once(pg_settings, celery, batch=10)):
            passes.append(n)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sent_job_ids()) == sorted(jobs)  # every job once, none twice
    assert sum(passes) == 60 and len(passes) == 6
    with session_scope(pg_settings) as s:
        assert s.query(Job).filter(Job.enqueued_at.is_(None)).count() == 0


def test_a_pass_reads_the_unsent_jobs_through_their_index(pg_settings):
    """However long the backlog of jobs already sent, and however many jobs ended with no message
    recorded, a relay pass reads only the queued jobs whose message is unsent."""
    add_queued_jobs(pg_settings, 3)
    with psycopg.connect(pg_settings.database_url.replace("+psycopg", ""),
                         autocommit=True) as conn:
        conn.execute("UPDATE jobs SET enqueued_at = 1")  # a backlog, its messages in the broker
        conn.execute("INSERT INTO jobs (id, tenant_id, model, training_file, spec, status, "
                     "created_at, cancel_requested, result_files, attempts, "
                     "lost_without_progress) SELECT 'ftjob-' || i, tenant_id, model, "
                     "training_file, spec, 'queued', 0, false, '[]', 0, 0 "
                     "FROM (SELECT * FROM jobs LIMIT 1) j, generate_series(1, 20000) i")
        conn.execute("UPDATE jobs SET enqueued_at = 1 WHERE enqueued_at IS NULL AND "
                     "id NOT IN ('ftjob-1', 'ftjob-2')")
        # Jobs that ended with no message recorded (cancelled before one was sent, or from an
        # older release that recorded sends only of jobs still queued): not the relay's rows.
        conn.execute("UPDATE jobs SET status = 'cancelled', enqueued_at = NULL "
                     "WHERE id LIKE 'ftjob-1%%' AND id <> 'ftjob-1'")
        conn.execute("ANALYZE jobs")
        engine = session_factory(pg_settings).kw["bind"]
        sql = str(relay.UNSENT.params(batch=500).compile(
            engine, compile_kwargs={"literal_binds": True}))
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE) " + sql).fetchall())
    assert "ix_jobs_unsent" in plan and "Rows Removed by Filter" not in plan, plan
    assert relay.relay_once(pg_settings, make_celery(pg_settings)) == 2
