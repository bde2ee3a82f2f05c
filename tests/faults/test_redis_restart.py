"""Fault: the broker (a Redis without persistence) is killed -9 and restarted empty while one job
runs and two wait in it."""

from __future__ import annotations

import time

import pytest

from store.queue import EPOCH_KEY
from tests.faults.conftest import Store, Worker, _wait, job_body, queued_messages

pytestmark = pytest.mark.slow


def test_redis_restart_loses_no_queued_job_and_runs_none_twice(service, redis_server, tmp_path):
    client, settings, store = service["client"], service["settings"], Store(service["settings"])
    worker = Worker(settings, tmp_path / "worker.log")  # one worker: one job at a time
    try:
        _wait(lambda: redis_server.client().get(EPOCH_KEY), 30, "the worker's reaper never ran")
        jobs = [client.fine_tuning.jobs.create(**job_body(service["file"], epochs)).id
                for epochs in (3, 1, 1)]
        running = _wait(lambda: (j := store.job(jobs[0])).status == "running" and
                        (j.progress or {}).get("step", 0) >= 1 and j, 120, "first job never ran")
        assert [store.job(j).status for j in jobs[1:]] == ["queued", "queued"]
        assert queued_messages(redis_server) >= 2  # the two waiting jobs' messages are in Redis

        redis_server.kill()
        redis_server.start()  # same port, empty
        restarted = time.time()
        assert queued_messages(redis_server) == 0, "the restarted Redis should hold no message"
        assert store.job(jobs[0]).status == "running"

        done = [store.wait_status(j, timeout=240) for j in jobs]
        log = worker.log_text()
    finally:
        worker.stop()

    assert "the broker lost its messages" in log  # the reaper noticed and re-sent
    for job in done:
        events = store.events(job.id)
        assert job.status == "succeeded", (job.id, job.error)
        # ran once: one claim, one start event, one ending
        assert job.attempts == 1, (job.id, events)
        assert events.count("Fine-tuning job started.") == 1, events
        assert not any("started again" in m or "re-queued" in m for m in events), events
        assert sum("successfully completed" in m for m in events) == 1, events
    # the two that waited were sent again after the restart, by the reaper
    assert all(store.job(j).enqueued_at > restarted for j in jobs[1:])
    assert running.attempts == 1
