"""Fault: the API process is SIGKILLed the moment it has committed a job.

The API never sends a job's message: the committed row (queued, no message recorded) is the
whole of a creation, and a worker's relay sends the message. So an API killed after its commit
loses nothing, whenever the kill lands: nothing of the job was still to be done in the API."""

from __future__ import annotations

import pytest

from store.queue import EPOCH_KEY
from tests.faults.conftest import (
    Api,
    Store,
    assert_ran_once,
    finish_with_a_worker,
    job_body,
    queued_messages,
)
from tests.live import new_tenant_key

pytestmark = pytest.mark.slow


def test_api_killed_after_the_commit_its_job_still_runs_once(fault_settings, redis_server,
                                                              training_file, tmp_path):
    """The API answers the creation (its row committed) and is SIGKILLed at once; no message
    exists anywhere. A worker started afterwards must find the committed job, send its message
    (its relay) and run it exactly once."""
    from openai import OpenAI

    store = Store(fault_settings)
    # A broker that has been running a while: the worker's relay sends this job because its row
    # records no message, not because its reaper finds the broker new and re-sends everything.
    redis_server.client().set(EPOCH_KEY, b"before")
    key = new_tenant_key(fault_settings, "faults")
    api = Api(fault_settings, tmp_path / "api.log")
    try:
        client = OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)
        with open(training_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(**job_body(file_id, epochs=1))
        api.kill()
        assert job.status == "queued"  # committed and answered
    finally:
        api.stop()
    row = store.job(job.id)
    assert (row.status, row.enqueued_at) == ("queued", None)
    assert queued_messages(redis_server) == 0  # the API sent nothing

    done, events = finish_with_a_worker(fault_settings, store, job.id, tmp_path / "worker.log")
    assert_ran_once(done, events)
    assert done.enqueued_at is not None  # sent by the worker's relay
