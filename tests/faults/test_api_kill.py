"""Fault: the API process is SIGKILLed after committing a job and before its wake-up message is
sent."""

from __future__ import annotations

import pytest

from store.queue import EPOCH_KEY
from tests.faults.conftest import (
    Api,
    FreezableProxy,
    Store,
    Worker,
    _wait,
    job_body,
    queued_messages,
)
from tests.live import new_tenant_key

pytestmark = pytest.mark.slow


def test_api_killed_between_commit_and_enqueue_job_still_runs(fault_settings, redis_server,
                                                              training_file, tmp_path):
    """How the kill lands in that window, every time: the API reaches Redis only through a relay
    that freezes on the first LPUSH (kombu's send of a message) and from then on swallows every
    byte and answers nothing. Creating the job commits the row and answers 200; the wake-up, a
    background task after the response, then sends its LPUSH into the relay and waits for a
    reply that never comes (up to its 2 s socket timeout), so the message is undelivered and
    `enqueued_at` unset. The test waits until the relay has swallowed the LPUSH that names this
    job, SIGKILLs the API at once, and only then drops the relay: nothing of that send can ever
    reach Redis. A worker started afterwards (its reaper with a 2 s enqueue grace) must find the
    committed, never-sent job and run it."""
    from openai import OpenAI

    store = Store(fault_settings)
    proxy = FreezableProxy(redis_server.port, freeze_on=b"LPUSH")  # kombu's send of a message
    api_settings = fault_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{proxy.port}/0"})
    key = new_tenant_key(fault_settings, "faults")
    # A broker that has been running a while: its epoch marker is set, so the worker's reaper
    # sends this job because it has no recorded send, not because the broker looks new.
    redis_server.client().set(EPOCH_KEY, b"before")
    api = Api(api_settings, tmp_path / "api.log")
    try:
        client = OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)
        with open(training_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(**job_body(file_id, epochs=1))
        assert job.status == "queued"  # committed and answered
        _wait(lambda: job.id.encode() in proxy.swallowed, 5,
              "the API never tried to send the wake-up")
        api.kill()
    finally:
        api.stop()
        proxy.close()
    assert "could not enqueue" not in api.log_text()  # killed mid-send, not after giving up
    row = store.job(job.id)
    assert (row.status, row.enqueued_at) == ("queued", None)
    assert queued_messages(redis_server) == 0

    worker_settings = fault_settings.model_copy(update={"enqueue_grace_seconds": 2.0})
    worker = Worker(worker_settings, tmp_path / "worker.log")
    try:
        done = store.wait_status(job.id, timeout=180)
    finally:
        worker.stop()
    events = store.events(job.id)
    assert done.status == "succeeded", done.error
    assert done.enqueued_at is not None  # sent by the worker's reaper
    assert done.attempts == 1 and events.count("Fine-tuning job started.") == 1, events
    assert sum("successfully completed" in m for m in events) == 1
