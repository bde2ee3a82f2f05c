"""Fault: the worker is SIGKILLed (Celery parent and pool child at once) at a random step, ten
times in a row on one job, a fresh worker each time."""

from __future__ import annotations

import csv
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from tests.faults.conftest import STEPS_PER_EPOCH, Store, Worker, _wait, job_body
from tests.live import free_port

pytestmark = pytest.mark.slow

SEED = 20261128  # picks where each kill lands; a failure message names it
KILLS = 10
# 320 steps, a checkpoint every 8: room for ten kills even where an attempt runs two or three
# epochs before its kill lands (progress shows up to a second late; on a fast machine that is
# 40 steps, and 16 epochs ran out before the tenth kill).
EPOCHS = 40


class _Hooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        _Hooks.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_ten_sigkills_at_random_steps_then_one_exact_success(service, builtin_world, training_file,
                                                             tmp_path):
    from trainer.data import load_examples
    from trainer.loop import TrainJob, train
    from trainer.spec import TrainSpec

    client, settings, store = service["client"], service["settings"], Store(service["settings"])
    port = free_port()
    receiver = HTTPServer(("127.0.0.1", port), _Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    _Hooks.received = []
    assert httpx.post(f"{service['url']}/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/"},
                      headers={"Authorization": f"Bearer {service['key']}"}).status_code == 200

    def running(attempt: int):
        """The row while `attempt` runs (None before); fails at once if the job ended."""
        j = store.job(job_id)
        assert j.status in ("queued", "running"), (
            f"job {j.status} during attempt {attempt} (seed {SEED}): {j.error}")
        return j if j.status == "running" and j.attempts == attempt else None

    def run_and_kill(attempt: int) -> tuple[int, int, int]:
        """A fresh worker takes the job; SIGKILL it at a random step after it recorded a new
        checkpoint. Returns (checkpoint at its claim, kill target, newest checkpoint at kill)."""
        if attempt > 1:  # saves time only: the new worker's first reaper pass then requeues it
            _wait(lambda: time.time() - (store.job(job_id).heartbeat_at or 0) >
                  settings.stale_after_seconds, 30, "heartbeat never went stale")
        worker = Worker(settings, tmp_path / f"worker{attempt}.log", name=f"w{attempt}")
        try:
            row = _wait(lambda: running(attempt), 120, f"attempt {attempt} never started")
            # The attempt's starting point is known once it has resumed: a checkpoint saved an
            # instant before the last kill is recorded then, and becomes its claimed_step.
            _wait(lambda: sum("resumed from checkpoint" in m for m in store.events(job_id))
                  >= attempt - 1, 120, f"attempt {attempt} never resumed")
            start = store.job(job_id).claimed_step or 0
            # Only kill after this attempt recorded a new checkpoint: every loss is progress.
            ckpt = _wait(lambda: (c := store.latest_checkpoint(job_id)) > start and c, 120,
                         f"attempt {attempt} saved no checkpoint")
            # A random step early in the next epoch (progress shows up to ~0.5 s late, so a later
            # target would often run past the next checkpoint and use up two epochs).
            target = ckpt + rng.randint(0, STEPS_PER_EPOCH // 2 - 1)
            _wait(lambda: ((running(attempt) or row).progress or {}).get("step", 0) >= target
                  or store.latest_checkpoint(job_id) > ckpt, 120,
                  f"attempt {attempt} never reached step {target}")
        finally:
            worker.kill()
            worker.stop()
        return start, target, store.latest_checkpoint(job_id)

    rng = random.Random(SEED)
    t0 = time.monotonic()
    job_id = client.fine_tuning.jobs.create(**job_body(service["file"], EPOCHS)).id
    kills = []  # (checkpoint at the claim, kill target, newest recorded checkpoint at the kill)
    try:
        for attempt in range(1, KILLS + 1):
            kills.append(run_and_kill(attempt))
            print(f"{time.monotonic() - t0:6.1f}s kill {attempt}: claimed at checkpoint "
                  f"{kills[-1][0]}, killed at step {kills[-1][1]}+ (checkpoint {kills[-1][2]})")
        last = Worker(settings, tmp_path / "worker-last.log", name="wlast")
        try:
            job = store.wait_status(job_id)
            _wait(lambda: _Hooks.received, 30, "no webhook delivered")
            time.sleep(2.5)  # one more sender pass: a second delivery would show now
        finally:
            last.stop()
    finally:
        receiver.shutdown()

    assert job.status == "succeeded", (job.error, SEED)
    events = store.events(job_id)
    # Ended exactly once, after 10 losses, none counted against it by the poison-pill guard.
    assert sum("successfully completed" in m for m in events) == 1
    assert job.attempts == KILLS + 1 and job.lost_without_progress == 0
    assert events.count("Fine-tuning job started.") == 1
    for n in range(2, KILLS + 2):
        assert sum(f"(attempt {n})" in m for m in events) == 1, n
    assert sum("re-queued" in m for m in events) == KILLS
    assert not any("failed" in m.lower() for m in events)
    # Each attempt resumed from the newest checkpoint at its predecessor's death: the recorded
    # one, or one saved to disk an instant before the kill whose row was not written yet.
    resumed = [int(m.rsplit(" ", 1)[1]) for m in events if "resumed from checkpoint at step" in m]
    assert len(resumed) == KILLS
    for (start, target, recorded), step in zip(kills, resumed, strict=True):
        assert recorded <= step <= recorded + STEPS_PER_EPOCH and step % STEPS_PER_EPOCH == 0, (
            start, target, recorded, step, SEED)
    assert resumed == sorted(set(resumed))
    assert store.webhooks(job_id) == ["fine_tuning.job.succeeded"]
    assert [h["type"] for h in _Hooks.received] == ["fine_tuning.job.succeeded"]

    # Every step's loss equals an uninterrupted run's: the results file keeps the steps from
    # before each resume, and resumed training is exact (weights, optimizer, scheduler, RNG).
    print(f"{time.monotonic() - t0:6.1f}s succeeded; training it again uninterrupted")
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    spec = TrainSpec.model_validate(job.spec)
    # The same spec and data in one uninterrupted call. Without checkpoints and scoring (they are
    # 7/8 of its time and touch no training state: scoring is greedy, SliCK has its own
    # generator), so any difference is the resumes'.
    direct = train(TrainJob(spec=spec, model_dir=builtin_world / "model",
                            train_examples=load_examples(training_file), slick=None,
                            save_checkpoints=False, output_dir=tmp_path / "direct"))
    assert [int(r["step"]) for r in rows] == list(range(1, direct.total_steps + 1))
    diffs = [abs(float(r["train_loss"]) - loss) for r, loss in zip(rows, direct.losses)]
    print(f"{time.monotonic() - t0:6.1f}s resumed from {resumed}; "
          f"max |loss - uninterrupted loss| over {len(diffs)} steps = {max(diffs):.2e}")
    assert max(diffs) <= 1e-5, [(i + 1, d) for i, d in enumerate(diffs) if d > 1e-5]
