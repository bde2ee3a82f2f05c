"""Fault: a worker dies holding a job's only message, after taking it off the queue and before
recording it as delivered (kombu's Redis transport pops first and records second)."""

from __future__ import annotations

import pytest

from store.queue import EPOCH_KEY
from tests.faults.conftest import (
    FreezableProxy,
    Store,
    Worker,
    _wait,
    assert_ran_once,
    finish_with_a_worker,
    job_body,
    queued_messages,
)

pytestmark = pytest.mark.slow


def test_a_message_lost_in_a_dying_consumer_is_sent_again_and_the_job_runs_once(
        service, redis_server, tmp_path):
    """The first worker reaches Redis through a proxy that freezes on its first ZADD to kombu's
    `unacked_index`: the start of the pipeline that records a message it has just popped
    (BRPOP) as unacknowledged. The
    test SIGKILLs that worker there and drops the proxy, so the message is neither in the queue
    nor among the delivered ones, while the job's row says its message was sent. A second
    worker's reaper must notice, and the job must run exactly once."""
    client, store = service["client"], Store(service["settings"])
    # Workers look for lost messages every second, and count one lost after 3 s.
    settings = service["settings"].model_copy(update={"lost_message_after_seconds": 3.0})
    # A broker that has been running a while: what the second worker re-sends is this one job's
    # message, not every queued job's after finding the broker new.
    redis_server.client().set(EPOCH_KEY, b"before")
    proxy = FreezableProxy(redis_server.port, freeze_on=b"ZADD\r\n$13\r\nunacked_index")
    first = Worker(settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{proxy.port}/0"}), tmp_path / "worker1.log")
    try:
        job = client.fine_tuning.jobs.create(**job_body(service["file"], epochs=1))
        _wait(proxy.frozen.is_set, 60, "the first worker never took the message")
        first.kill()
    finally:
        first.stop()
        proxy.close()
    row = store.job(job.id)
    assert row.status == "queued" and row.enqueued_at is not None  # sent, as far as the row knows
    assert queued_messages(redis_server) == 0
    assert redis_server.client().hlen("unacked") == 0  # and never recorded as delivered

    done, events = finish_with_a_worker(settings, store, job.id, tmp_path / "worker2.log")
    assert_ran_once(done, events)
    assert done.enqueued_at > row.enqueued_at  # a second message, sent by the relay
    assert sum("wake-up message was lost" in m for m in events) == 1, events
