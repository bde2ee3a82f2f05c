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
