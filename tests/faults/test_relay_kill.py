"""Fault: the worker whose relay is sending a job's message is SIGKILLed mid-send."""

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


def test_relay_killed_mid_send_the_next_worker_sends_and_runs_the_job_once(
        fault_settings, redis_server, training_file, tmp_path):
    """How the kill lands mid-send, every time: the first worker reaches Redis through a proxy
    that freezes on the first LPUSH (the relay's send of a message) and from then on swallows
    every byte and answers nothing. The test waits until the proxy has swallowed the LPUSH that
    names the job, SIGKILLs that worker, and only then drops the proxy: nothing of that send can
    reach Redis, and the row records no message. A second worker must send it and run the job
    exactly once."""
    from openai import OpenAI

    store = Store(fault_settings)
    proxy = FreezableProxy(redis_server.port, freeze_on=b"LPUSH")
    # A broker that has been running a while: the second worker's relay sends the job because
    # its row records no message, not because its reaper finds the broker new.
    redis_server.client().set(EPOCH_KEY, b"before")
    key = new_tenant_key(fault_settings, "faults")
    api = Api(fault_settings, tmp_path / "api.log")
    first = Worker(fault_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{proxy.port}/0"}), tmp_path / "worker1.log")
    try:
        client = OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)
        with open(training_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(**job_body(file_id, epochs=1))
        _wait(lambda: job.id.encode() in proxy.swallowed, 60,
              "the first worker's relay never tried to send the message")
        first.kill()
    finally:
        first.stop()
        proxy.close()
    row = store.job(job.id)
    assert (row.status, row.enqueued_at) == ("queued", None)
    assert queued_messages(redis_server) == 0

    second = Worker(fault_settings, tmp_path / "worker2.log")
    try:
        done = store.wait_status(job.id, timeout=180)
    finally:
        second.stop()
        api.stop()
    events = store.events(job.id)
    assert done.status == "succeeded", done.error
    assert done.enqueued_at is not None  # sent by the second worker's relay
    assert done.attempts == 1 and events.count("Fine-tuning job started.") == 1, events
    assert sum("successfully completed" in m for m in events) == 1
