"""The relay on PostgreSQL and Redis, as workers run it: relays in several workers send each job's
message once, and a new job's message leaves on the database's notification, not on a timer."""

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


def test_a_new_job_is_sent_on_the_databases_notification(pg_settings):
    """The relay polls only every 30 s here: a job sent within seconds was sent because the
    trigger notified it."""
    settings = pg_settings.model_copy(update={"relay_poll_seconds": 30.0})
    stop = threading.Event()
    thread = relay.start_relay(settings, make_celery(settings), stop=stop)
    try:
        time.sleep(1.0)  # past its first pass, waiting
        [job] = add_queued_jobs(settings, 1)
        created = time.monotonic()
        while job not in sent_job_ids():
            assert time.monotonic() - created < 5, "the relay did not wake on the notification"
            time.sleep(0.02)
        print(f"\nsent {1000 * (time.monotonic() - created):.0f} ms after the commit")
    finally:
        stop.set()
        database = settings.database_url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:  # end its wait at once
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND query LIKE 'LISTEN%%'", (database,))
        thread.join(10)
