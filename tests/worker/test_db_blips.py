"""A database blip while a job trains must not fail the job: beats and writes retry."""

import pytest
from sqlalchemy.exc import OperationalError

import worker.runner as runner
from store.settings import Settings


def blip(*_a, **_k):
    raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))


def test_a_failed_heartbeat_is_retried_next_period_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "session_scope", blip)
    beat = runner._Beat(Settings(data_dir=tmp_path, secret_key="x"), "ftjob-x", "w", 1e12)
    beat.beat()  # called from the trainer's metrics callback: raising here failed the job
    assert not beat.lost and not beat.stop
    assert beat.should_stop() is False


def test_database_writes_retry_until_the_database_is_back(monkeypatch):
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            blip()
        return "written"

    assert runner.with_db_retry(flaky, "test") == "written" and len(calls) == 4
    with pytest.raises(OperationalError):
        runner.with_db_retry(blip, "test", give_up_after_s=0)


def test_a_job_past_its_time_limit_stops(tmp_path):
    beat = runner._Beat(Settings(data_dir=tmp_path, secret_key="x"), "ftjob-x", "w",
                        deadline=0.0)
    assert beat.timed_out and beat.should_stop()


def test_a_claim_the_database_refuses_is_retried_not_dropped(monkeypatch, tmp_path):
    """The wake-up message is the job's only one: a claim that raised ('database is locked' on
    SQLite, seen when a slow CI machine made a writer hold the lock past 30 s) left the job
    queued forever. Now the claim is retried until the database takes it."""
    from store.db import session_scope
    from store.models import JobEvent
    from tests.worker.test_reaper import add_job, setup

    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    settings = setup(tmp_path)
    job_id = add_job(settings, status="queued")
    real, calls = runner.claim_job, []

    def locked_once(session, *args):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return real(session, *args)

    monkeypatch.setattr(runner, "claim_job", locked_once)
    job = runner.with_db_retry(lambda: runner._claim(settings, job_id, "w1"), "claim")
    assert job is not None and len(calls) == 2
    with session_scope(settings) as s:
        row = s.query(runner.Job).filter_by(id=job_id).one()
        assert (row.status, row.worker_id, row.attempts) == ("running", "w1", 1)
        assert s.query(JobEvent).filter_by(job_id=job_id).count() == 1
    assert runner._claim(settings, job_id, "w2") is None  # claimed once, by one worker


def test_a_start_event_the_database_refused_does_not_leave_the_claim_behind(monkeypatch,
                                                                           tmp_path):
    """The claim and its 'started' event commit together: the claim used to commit first, so
    a retry after a failed event found the job already taken (by this worker), returned None,
    and the job sat 'running' with no one training it until the reaper counted a lost worker
    (three such blips failed the job)."""
    from store.db import session_scope
    from store.models import JobEvent
    from tests.worker.test_reaper import add_job, setup

    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    settings = setup(tmp_path)
    job_id = add_job(settings, status="queued")
    real, calls = runner.add_event, []

    def refused_once(session, *args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT INTO job_events", {}, Exception("connection reset"))
        return real(session, *args, **kw)

    monkeypatch.setattr(runner, "add_event", refused_once)
    job = runner.with_db_retry(lambda: runner._claim(settings, job_id, "w1"), "claim")
    assert job is not None and len(calls) == 2
    with session_scope(settings) as s:
        row = s.query(runner.Job).filter_by(id=job_id).one()
        assert (row.status, row.worker_id, row.attempts, row.lost_without_progress) == (
            "running", "w1", 1, 0)
        assert s.query(JobEvent).filter_by(job_id=job_id).count() == 1
