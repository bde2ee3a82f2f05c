"""One job, start to end, in the process Celery gave it (a fresh one per job).

Claims the row, resolves model and files, hands a TrainJob to the trainer with callbacks that
write events, progress and checkpoints to the store, heartbeats from a side thread (which also
picks up cancel requests), and finishes the row once. Training errors end the job `failed` with a
message for the client; the traceback goes to the server log only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.jobstate import JobStatus
from store.models import Checkpoint, Job, StoredFile
from store.public import error_code
from store.queue import task_time_limit
from store.settings import Settings
from worker.lifecycle import (
    add_event,
    cancel_requested,
    claim_job,
    finish_job,
    heartbeat,
    record_checkpoint,
)

log = logging.getLogger(__name__)
METRICS_EVENT_EVERY_S = 2.0  # metrics events; every step still lands in the results CSV
DB_RETRY_S = 600.0  # how long a job rides out a database outage before it gives up
HISTORY_FILE = "metrics.jsonl"  # every step's metrics, kept across resumes for the results file
PROGRESS_EVERY_S = 1.0
CANCEL_POLL_S = 0.5  # the stop flag is read this often, so a cancel lands within a few steps


class ClaimUnavailable(Exception):
    """The database stayed down for the whole claim retry: the job is still queued and its
    message is the only one, so the task must put a message back (worker/app.py) rather than
    end, or the job would wait for a worker that never comes."""


class JobTaken(Exception):
    """Another worker owns the job now (this one's heartbeat went stale, say through a database
    outage, and the reaper requeued it): stop at once and write nothing more to it. A graceful
    stop would save a checkpoint into the folder the new owner trains in and record it."""


class JobFailure(Exception):
    """A failure whose message is meant for the client."""

    def __init__(self, message: str, code: str = "training_failed"):
        super().__init__(message)
        self.code = code


class MetricsHistory:
    """Every step's metrics as JSON lines in the job's folder, so the results file of a resumed
    job covers the steps before the resume too. Steps after the checkpoint a run resumes from are
    dropped first: they are trained again."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / HISTORY_FILE

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows() if r["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics, default=float) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _resume_step(job_dir: Path) -> int:
    """The step the trainer will resume from: that of its newest complete checkpoint, or 0."""
    from trainer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(job_dir) / "checkpoints")
    return json.loads((latest / "trainer_state.json").read_text())["step"] if latest else 0


def _record_unrecorded(settings: Settings, job: Job, job_dir: str, artifacts: ArtifactStore,
                       step: int) -> None:
    """A worker killed between saving a checkpoint and recording it left a folder with no row:
    the resume uses it, so it is recorded now (it is progress, and retention must see it). The
    step this attempt starts from becomes its `claimed_step`, so the poison-pill guard measures
    this attempt's own progress, not its predecessor's a second time."""
    if not step:
        return
    from trainer.checkpoint import checkpoint_dir

    folder = checkpoint_dir(artifacts.path(f"{job_dir}/checkpoints"), step)
    with session_scope(settings) as s:
        if s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job.id,
                                                Checkpoint.step_number == step)) is None:
            metrics = json.loads((folder / "trainer_state.json").read_text()).get("metrics", {})
            record_checkpoint(s, job, step, f"{job_dir}/checkpoints/{folder.name}", metrics)
        s.execute(update(Job).where(Job.id == job.id, or_(Job.claimed_step.is_(None),
                                                          Job.claimed_step < step))
                  .values(claimed_step=step))


def prune_checkpoints(session, artifacts: ArtifactStore, job_id: str, keep_last: int) -> list[str]:
    """Retention: the last `keep_last` checkpoints and every drift-safe one stay; the rows of the
    others are deleted here and their folders returned for deletion after the commit."""
    rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                .order_by(Checkpoint.step_number.desc())))
    doomed = [c for c in rows[keep_last:] if not c.drift_safe]
    for c in doomed:
        session.delete(c)
    return [c.storage_path for c in doomed]


def resolve_model(settings: Settings, model_id: str) -> tuple[Path, Path | None]:
    """(model directory, default known-fact file or None)."""
    from trainer.builtin import MODEL_ID, default_world_dir

    if model_id == MODEL_ID:
        world = default_world_dir(log=log.info)
        return world / "model", world / "heldout_known.jsonl"
    if model_id in settings.models:
        return Path(settings.models[model_id]), None
    raise JobFailure(f"model '{model_id}' is not available on this worker")


def with_db_retry(fn, what: str, give_up_after_s: float = DB_RETRY_S):
    """Run a database write, riding out a restart or a blip of the database (the pool replaces
    a connection that fails its ping or its query); re-raise once it has been down for
    `give_up_after_s`."""
    deadline = time.monotonic() + give_up_after_s
    delay = 0.2
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError):
            if time.monotonic() > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Beat:
    """Heartbeat thread: stamps the row, carries the latest progress, notices cancel, loss of
    ownership and the job's time limit; the trainer's stop flag is `should_stop`."""

    def __init__(self, settings: Settings, job_id: str, worker_id: str, deadline: float):
        self.settings, self.job_id, self.worker_id = settings, job_id, worker_id
        self.deadline = deadline  # time.monotonic() by which the job must end
        self.progress: dict | None = None
        self.stop = False
        self.lost = False
        self._polled = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    @property
    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        """Read by the trainer before every step; looks at the row at most every CANCEL_POLL_S.
        A database that cannot be read right now does not stop training. A job taken by
        another worker is not stopped but abandoned (`JobTaken`)."""
        if self.lost:
            raise JobTaken(self.job_id)
        if self.timed_out:
            self.stop = True
        if not self.stop and time.monotonic() - self._polled >= CANCEL_POLL_S:
            self._polled = time.monotonic()
            try:
                with session_scope(self.settings) as s:
                    self.stop = cancel_requested(s, self.job_id)
            except (OperationalError, InterfaceError):
                log.warning("cancel poll failed for %s; will look again", self.job_id)
        return self.stop

    def beat(self) -> None:
        try:
            with session_scope(self.settings) as s:
                ours, cancel = heartbeat(s, self.job_id, self.worker_id, self.progress)
        except (OperationalError, InterfaceError):
            log.warning("heartbeat failed for %s; the next one retries", self.job_id)
            return
        self.lost = not ours
        self.stop = self.stop or cancel or self.lost

    def _run(self) -> None:
        while not self._done.wait(self.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried next period
                log.warning("heartbeat failed for %s", self.job_id, exc_info=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)


def _load(artifacts: ArtifactStore, session, job: Job, file_id: str):
    from trainer.data import load_examples

    row = session.query(StoredFile).filter_by(id=file_id, tenant_id=job.tenant_id).one_or_none()
    if row is None:
        raise JobFailure(f"file '{file_id}' no longer exists")
    return load_examples(artifacts.path(row.storage_path))


def run_job(settings: Settings, job_id: str, worker_id: str) -> str | None:
    """Run the job if this worker can claim it; returns its final status (None: not claimed)."""
    try:
        job = with_db_retry(lambda: _claim(settings, job_id, worker_id), "claim")
    except (OperationalError, InterfaceError) as e:
        raise ClaimUnavailable(job_id) from e
    if job is None:
        return None  # a duplicate message, a cancelled job, or another worker has it
    artifacts = ArtifactStore(settings.artifacts_dir)
    # Beat from the moment of the claim: loading torch and the model can take longer than a
    # stale-heartbeat period, and a silent claimed job looks exactly like a dead worker.
    deadline = time.monotonic() + task_time_limit(settings, job.total_steps)
    with _Beat(settings, job.id, worker_id, deadline) as beat:
        try:
            return _train(settings, artifacts, job, worker_id, beat)
        except JobTaken:
            log.warning("job %s was taken from this worker; leaving it alone", job.id)
            return "lost"
        except Exception as e:  # noqa: BLE001 - every failure must end the row
            return _fail(settings, job, worker_id, e)


def _claim(settings: Settings, job_id: str, worker_id: str) -> Job | None:
    """Claim the job (queued -> running) and record its start, in one transaction. Retried by
    the caller on a database error: the message that woke this worker is the job's only one
    (its send is recorded), so a claim that raised left the job queued with no worker coming
    for it. Seen on a slow machine: SQLite's 'database is locked' after its 30 s wait. (The
    claim once committed before its event: a retry after a failed event found the job taken by
    itself, left it, and the reaper counted a lost worker.)"""
    with session_scope(settings) as s:
        job = claim_job(s, job_id, worker_id)
        if job is not None:
            add_event(s, job, "Fine-tuning job started." if job.attempts == 1 else
                      f"Fine-tuning job started again (attempt {job.attempts}) on a new worker.")
        return job


def _fail(settings: Settings, job: Job, worker_id: str, e: Exception) -> str:
    """End the job `failed` with a message for the client; the traceback goes to the log."""
    ours = isinstance(e, (JobFailure, ValueError))
    message = str(e) if ours else (
        f"internal error during training ({type(e).__name__}); the operators have the log")
    code = error_code(getattr(e, "code", None) if ours else None)
    log.exception("job %s failed", job.id)

    def write() -> str:
        with session_scope(settings) as s:
            return JobStatus.FAILED if finish_job(s, job.id, worker_id, JobStatus.FAILED, error={
                "code": code, "message": message[:2000],
                "param": None}, message=f"Job failed: {message[:500]}", level="error") else "lost"
    return with_db_retry(write, "fail")


def _train(settings: Settings, artifacts: ArtifactStore, job: Job, worker_id: str,
           beat: _Beat) -> str:
    from trainer.data import require_qa_facts
    from trainer.loop import Callbacks, TrainJob, train
    from trainer.spec import TrainSpec

    spec = TrainSpec.model_validate(job.spec)
    model_dir, default_known = resolve_model(settings, job.model)
    with session_scope(settings) as s:
        examples = _load(artifacts, s, job, job.training_file)
        known = _load(artifacts, s, job, job.known_facts_file) if job.known_facts_file else None
    if known is None and default_known is not None:
        from trainer.data import load_examples
        known = load_examples(default_known)
    known = (known or [])[: spec.evaluation.max_known_facts]
    require_qa_facts(known, "known-fact")
    job_dir = artifacts.job_dir(job.tenant_id, job.id)
    history = MetricsHistory(artifacts.path(job_dir))

    last_event, last_progress = [0.0], [0.0]

    def on_event(level: str, message: str) -> None:
        def write():
            with session_scope(settings) as s:
                add_event(s, job, message, level="warn" if level == "warning" else level)
        with_db_retry(write, "event")

    def on_metrics(m: dict) -> None:
        history.append(m)
        beat.progress = {"step": m["step"], "total_steps": m["total_steps"],
                         "epoch": round(m["epoch"], 3),
                         "seconds_remaining": round(m["seconds_remaining"], 1)}
        clock = time.monotonic()
        if clock - last_event[0] >= METRICS_EVENT_EVERY_S or m["step"] == m["total_steps"]:
            last_event[0] = clock
            try:  # a metrics event is a sample: one lost to a database blip is not retried
                with session_scope(settings) as s:
                    add_event(s, job, f"Step {m['step']}/{m['total_steps']}: training loss="
                                      f"{m['train_loss']:.4f}", type="metrics", data=m)
            except (OperationalError, InterfaceError):
                log.warning("metrics event for %s skipped: database unavailable", job.id)
        if clock - last_progress[0] >= PROGRESS_EVERY_S:
            last_progress[0] = clock
            beat.beat()  # progress is visible within a second, not a heartbeat period

    def on_checkpoint(info) -> None:
        if beat.lost:  # not ours to record (nor to prune) any more
            raise JobTaken(job.id)
        rel = f"{job_dir}/checkpoints/{info.path.name}"

        def write():
            with session_scope(settings) as s:
                record_checkpoint(s, job, info.step, rel, info.metrics)
                if info.metrics:
                    forgetting = info.metrics.get("forgetting")
                    add_event(s, job, f"Checkpoint at step {info.step}: held-out known accuracy "
                                      f"{info.metrics.get('heldout_known_accuracy') or 0:.3f}, "
                                      "forgetting " + ("unmeasured (the base model answered "
                                                       "none of the held-out facts)"
                                                       if forgetting is None
                                                       else f"{forgetting:.3f}"),
                              type="metrics", data={
                                  "step": info.step,
                                  "known_accuracy": info.metrics.get("heldout_known_accuracy"),
                                  **info.metrics})
                return prune_checkpoints(s, artifacts, job.id, settings.keep_last_checkpoints)
        for path in with_db_retry(write, "checkpoint"):
            artifacts.delete(path)  # after the rows are gone: never a row without its files

    resume_step = _resume_step(artifacts.path(job_dir))
    history.truncate_after(resume_step)
    with_db_retry(lambda: _record_unrecorded(settings, job, job_dir, artifacts, resume_step),
                  "checkpoint")
    result = train(TrainJob(spec=spec, model_dir=model_dir, train_examples=examples,
                            known_facts=known, output_dir=artifacts.path(job_dir),
                            log_every_n_steps=1, max_tokens=settings.max_job_tokens),
                   Callbacks(on_event=on_event, on_metrics=on_metrics,
                             on_checkpoint=on_checkpoint, should_stop=beat.should_stop))
    if beat.lost:
        log.warning("job %s was taken from this worker; leaving its row alone", job.id)
        return "lost"
    if result.status == JobStatus.CANCELLED and beat.timed_out:
        raise JobFailure(f"the job ran past its time limit of "
                         f"{task_time_limit(settings, job.total_steps):.0f} s at step "
                         f"{result.step}/{result.total_steps}; its last checkpoint is kept",
                         code="time_limit_exceeded")
    return with_db_retry(lambda: _finish(settings, artifacts, job, worker_id, result,
                                         history.rows()), "finish")


def _finish(settings: Settings, artifacts: ArtifactStore, job: Job, worker_id: str, result,
            history: list[dict]) -> str:
    """The final transaction: results file, status, evaluation, event and webhooks together."""
    hp = result.spec.method.hyperparameters.model_dump(mode="json")
    common = dict(hyperparameters=hp, trained_tokens=result.trained_tokens)
    with session_scope(settings) as s:
        common["result_files"] = [_results_file(s, artifacts, job, history)]
        if result.status == JobStatus.CANCELLED:
            return JobStatus.CANCELLED if finish_job(
                s, job.id, worker_id, JobStatus.CANCELLED, **common,
                message=f"Job cancelled at step {result.step}; its last checkpoint is kept.") \
                else "lost"
        suffix = f":{job.suffix}" if job.suffix else ""
        safe = (result.report or {}).get("drift_safe")
        return JobStatus.SUCCEEDED if finish_job(
            s, job.id, worker_id, JobStatus.SUCCEEDED, **common, evaluation=result.report,
            fine_tuned_model=f"ft:{job.model}:{job.tenant_id}{suffix}:{job.id}",
            message="The job has successfully completed" + (
                f"; drift-safe: {safe}" if safe is not None else "")) else "lost"


def _results_file(session, artifacts: ArtifactStore, job: Job, history: list[dict]) -> str:
    """A results CSV, stored as a file the client can fetch (OpenAI's result_files)."""
    import hashlib

    columns = ["step", "epoch", "train_loss", "ce_loss", "distill_loss", "learning_rate"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    data = buf.getvalue().encode()
    row = StoredFile(tenant_id=job.tenant_id, filename=f"{job.id}-results.csv",
                     purpose="fine-tune-results", bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), lines=len(history), storage_path="")
    session.add(row)
    session.flush()
    row.storage_path = f"{artifacts.job_dir(job.tenant_id, job.id)}/results-{row.id}.csv"
    artifacts.write_bytes(row.storage_path, data)
    return row.id
