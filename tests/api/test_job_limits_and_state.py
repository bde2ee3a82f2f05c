"""Job creation caps and quotas, guarded cancellation, webhooks on every ending, and filters that
run in the database."""

import pytest

from store.db import session_scope
from store.models import Job, JobEvent, WebhookDelivery
from tests.api.conftest import h, upload
from tests.api.test_files_and_jobs import count, create_job


def test_a_job_over_the_step_cap_is_400_naming_the_cap(client, alice, settings):
    client.app.state.settings.max_job_steps = 50  # the route reads the live settings
    fid = upload(client, alice).json()["id"]  # 6 examples
    r = create_job(client, alice, fid, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 51,
                                                                 "batch_size": 6}}})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "job_too_large"
    assert "max_job_steps=50" in err["message"] and err["param"].endswith("n_epochs")
    assert count(settings, Job) == 0
    ok = create_job(client, alice, fid, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50,
                                                                 "batch_size": 6}}})
    assert ok.status_code == 200


def test_running_jobs_quota_is_429_and_counts_only_active_jobs(client, alice, bob, settings):
    client.app.state.settings.max_running_jobs = 2
    fid = upload(client, alice).json()["id"]
    first, second = (create_job(client, alice, fid).json()["id"] for _ in range(2))
    r = create_job(client, alice, fid)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_running_jobs"
    assert "max_running_jobs=2" in r.json()["error"]["message"] and r.headers["Retry-After"]
    bob_file = upload(client, bob).json()["id"]
    assert create_job(client, bob, bob_file).status_code == 200  # per tenant
    client.post(f"/v1/fine_tuning/jobs/{first}/cancel", headers=h(alice))
    assert create_job(client, alice, fid).status_code == 200  # a finished job frees a slot


# PostgreSQL only: SQLite (the laptop setup) has no row locks, and its concurrent writers may
# overshoot a quota (as uploads may there, tests/api/test_uploads.py).
@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
def test_concurrent_creations_cannot_overshoot_the_running_jobs_quota(client, alice, settings):
    from concurrent.futures import ThreadPoolExecutor

    client.app.state.settings.max_running_jobs = 3
    fid = upload(client, alice).json()["id"]
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: create_job(client, alice, fid).status_code, range(8)))
    assert codes == [200] * 3 + [429] * 5
    assert count(settings, Job) == 3


def test_the_quota_count_stops_at_the_quota_and_zero_means_no_quota(client, alice, settings):
    """Checking the quota reads at most `max_running_jobs` of the tenant's active jobs, not the
    whole backlog (which every creation used to count); 0 lifts the quota and its query."""
    from sqlalchemy import event

    live = client.app.state.settings
    live.max_running_jobs = 0
    fid = upload(client, alice).json()["id"]
    statements = []
    engine = client.app.state.sessions.kw["bind"]
    listen = (engine, "before_cursor_execute")
    record = lambda conn, cursor, sql, *rest: statements.append(sql)  # noqa: E731
    event.listen(*listen, record)
    try:
        assert all(create_job(client, alice, fid).status_code == 200 for _ in range(5))
        assert statements and not any("count(" in q.lower() for q in statements)
    finally:
        event.remove(*listen, record)
    live.max_running_jobs = 3
    r = create_job(client, alice, fid)  # five active, counted up to the quota of three
    assert r.status_code == 429
    assert "already has 3 queued or running jobs" in r.json()["error"]["message"]
    assert count(settings, Job) == 5


def test_cancel_cannot_end_a_job_a_worker_claimed_meanwhile(client, alice, settings,
                                                           monkeypatch):
    """The job is read as queued, a worker claims it, then the cancel writes: the write must see
    the claim (guarded update), leaving the job running with the cancel flag for the worker."""
    import api.routes.jobs as jobs_route
    from worker.lifecycle import claim_job

    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    real_get = jobs_route.Scoped.get

    def get_then_claim(self, model, object_id, *a, **kw):
        row = real_get(self, model, object_id, *a, **kw)
        with session_scope(settings) as s:
            claim_job(s, jid, "worker-1")
        return row

    monkeypatch.setattr(jobs_route.Scoped, "get", get_then_claim)
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h(alice))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


# PostgreSQL only: on SQLite the cancel's first UPDATE takes the database's write lock, so no
# reaper can write between its statements.
@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
def test_cancel_ends_a_job_the_reaper_requeued_meanwhile(client, alice, settings, monkeypatch):
    """The cancel finds the job running (not queued), then the reaper puts it back in the queue
    before the cancel flags it as running: the job is queued, and the cancel ends it (it used to
    answer 409 'already queued')."""
    import api.routes.jobs as jobs_route
    from worker.lifecycle import claim_job

    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    with session_scope(settings) as s:
        claim_job(s, jid, "worker-1")
    real_transition, calls = jobs_route.transition, []

    def transition_then_requeue(*a, **kw):
        job = real_transition(*a, **kw)
        calls.append(job)
        if len(calls) == 1:
            with session_scope(settings) as s:
                s.query(Job).filter_by(id=jid).update({"status": "queued", "worker_id": None})
        return job

    monkeypatch.setattr(jobs_route, "transition", transition_then_requeue)
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h(alice))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and calls[0] is None


def test_cancelling_a_queued_job_sends_its_webhook(client, alice, settings):
    assert client.post("/v1/webhooks", headers=h(alice),
                       json={"url": "https://93.184.215.14/hook"}).status_code == 200
    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{jid}/cancel",
                       headers=h(alice)).json()["status"] == "cancelled"
    with session_scope(settings) as s:
        rows = s.query(WebhookDelivery).all()
        assert [(d.event, d.payload["data"]["id"]) for d in rows] == [
            ("fine_tuning.job.cancelled", jid)]
        assert s.query(JobEvent).filter_by(job_id=jid, message="Job cancelled before it "
                                                                 "started.").count() == 1


def test_metadata_filter_reads_only_matching_rows(client, alice, settings, monkeypatch):
    from sqlalchemy.orm import Session

    fid = upload(client, alice).json()["id"]
    wanted = create_job(client, alice, fid, metadata={"team": "search"}).json()["id"]
    for i in range(6):
        create_job(client, alice, fid, metadata={"team": f"other{i}"})
    fetched = []
    real = Session.scalars

    def scalars(self, *a, **kw):
        result = list(real(self, *a, **kw))
        fetched.append(len(result))
        return iter(result)

    monkeypatch.setattr(Session, "scalars", scalars)
    got = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "search"},
                     headers=h(alice)).json()
    assert [j["id"] for j in got["data"]] == [wanted]
    assert fetched == [1]  # the filter ran in the query: one row came back, not seven


def test_metadata_filters_take_any_key_a_job_can_carry(client, alice, settings):
    """Quotes, backslashes, dots and brackets in a key are plain characters: a SQLite JSON path
    cannot name a key holding a double quote: such a filter found nothing there."""
    fid = upload(client, alice).json()["id"]
    keys = ['a"b', "back\\slash", "dotted.key", "$[0]", "naïve ключ"]
    made = {k: create_job(client, alice, fid, metadata={k: "v" + k}).json()["id"] for k in keys}
    create_job(client, alice, fid, metadata={"other": "x"})
    for key in keys:
        got = client.get("/v1/fine_tuning/jobs", params={f"metadata[{key}]": "v" + key},
                         headers=h(alice))
        assert got.status_code == 200, (key, got.text)
        assert [j["id"] for j in got.json()["data"]] == [made[key]], key
        none = client.get("/v1/fine_tuning/jobs", params={f"metadata[{key}]": "other"},
                          headers=h(alice))
        assert none.status_code == 200 and none.json()["data"] == [], key


def test_a_job_creation_never_touches_the_broker(client, alice, settings, monkeypatch):
    """The committed row is the whole of a creation: its message is a worker relay's to send
    (worker/relay.py), so a broker that is down, or answers nothing, costs a creation nothing."""
    import time

    from celery import Celery

    touched = []

    def no_broker(*a, **kw):
        touched.append(a)
        raise ConnectionError("the API must not reach the broker")

    for name in ("send_task", "producer_or_acquire", "connection_for_write"):
        monkeypatch.setattr(Celery, name, no_broker)
    client.app.state.settings.max_running_jobs = 0
    fid = upload(client, alice).json()["id"]
    started = time.monotonic()
    ids = [create_job(client, alice, fid).json()["id"] for _ in range(3)]
    assert time.monotonic() - started < 5
    time.sleep(0.5)  # long enough for a background sender to have tried
    assert touched == []
    with session_scope(settings) as s:  # queued, with no message recorded: the relay's to send
        assert [s.query(Job).filter_by(id=i).one().enqueued_at for i in ids] == [None] * 3


def test_an_unreachable_database_is_503_with_retry_after_not_500(tmp_path):
    """A server whose database is down answers what a client can act on: 503, retry later."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.settings import Settings

    down = Settings(data_dir=tmp_path / "down", secret_key="x",
                    database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    with TestClient(create_app(down), raise_server_exceptions=False) as c:
        r = c.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer dsk-anything"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["error"]["code"] == "database_unavailable"


def test_a_small_pool_serves_concurrent_idempotent_posts_without_deadlock(settings, alice):
    """Each request holds at most one pooled connection (the idempotency record shares the
    request's session), so more concurrent requests than connections queue instead of each
    holding one connection while waiting for a second (which deadlocked into pool timeouts)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from api.app import create_app

    small = settings.model_copy(update={"db_pool_size": 2, "db_max_overflow": 0})
    with TestClient(create_app(small), raise_server_exceptions=False) as c:
        fid = upload(c, alice).json()["id"]

        def post(i):
            return c.post("/v1/fine_tuning/jobs", headers=h(alice, **{"Idempotency-Key": f"p{i}"}),
                          json={"model": "driftsafe-factlm-tiny", "training_file": fid}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(8)))
    assert codes == [200] * 8


def test_the_pool_keeps_a_connection_for_every_thread_that_holds_one():
    """Sync routes run on the request threads and slow work on the bulk threads, each request's
    session holding one pooled connection: with fewer pooled connections than threads, a burst
    of requests opens overflow connections and closes them again (a PostgreSQL backend forked
    per connection)."""
    from store.settings import Settings

    settings = Settings()
    assert settings.db_pool_size >= settings.request_threads + settings.bulk_threads


@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
def test_a_file_deleted_while_a_job_is_created_on_it_never_leaves_the_job_without_it(
        client, alice, settings, monkeypatch):
    """The delete arrives after the creation read the file and before it wrote the job. Either
    the delete waits and then sees the job (409), or the creation fails on the missing file:
    the job used to be queued on a deleted file and failed in the worker."""
    import threading

    import api.routes.jobs as jobs_route

    fid = upload(client, alice).json()["id"]
    real, deleted = jobs_route._checked_file, {}

    def delete_meanwhile(*a, **kw):
        found = real(*a, **kw)
        worker = threading.Thread(target=lambda: deleted.update(r=client.delete(
            f"/v1/files/{fid}", headers=h(alice))))
        worker.start()
        worker.join(1.0)  # done at once unless it waits for this creation to commit
        deleted["waited"] = worker.is_alive()
        deleted["thread"] = worker
        return found

    monkeypatch.setattr(jobs_route, "_checked_file", delete_meanwhile)
    created = create_job(client, alice, fid)
    deleted["thread"].join(10)
    assert deleted["waited"], "the delete did not wait for the creation"
    assert created.status_code == 200 and deleted["r"].status_code == 409
    assert deleted["r"].json()["error"]["code"] == "file_in_use"
