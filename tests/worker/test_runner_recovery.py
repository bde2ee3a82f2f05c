"""What a worker finds on disk when it resumes a job whose last worker was killed."""

import json

import pytest

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import Checkpoint, Job
from tests.worker.test_reaper import add_job, setup
from worker.runner import MetricsHistory, _record_unrecorded, _resume_step


def test_a_checkpoint_saved_but_never_recorded_is_recorded_on_resume(tmp_path):
    settings = setup(tmp_path)
    job_id = add_job(settings, status="running", worker_id="w", checkpoint_steps=[88])
    artifacts = ArtifactStore(settings.artifacts_dir)
    with session_scope(settings) as s:
        job = s.query(Job).filter_by(id=job_id).one()
    job_dir = artifacts.job_dir(job.tenant_id, job.id)
    folder = artifacts.path(f"{job_dir}/checkpoints/step-000096")
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 96, "metrics": {
        "drift_safe": True, "forgetting": 0.01}}))
    (folder / "trainer_state.pt").write_bytes(b"")
    assert _resume_step(artifacts.path(job_dir)) == 96
    _record_unrecorded(settings, job, job_dir, artifacts, 96)
    _record_unrecorded(settings, job, job_dir, artifacts, 96)  # once only
    with session_scope(settings) as s:
        rows = {c.step_number: c for c in s.query(Checkpoint).filter_by(job_id=job_id)}
        assert set(rows) == {88, 96} and rows[96].drift_safe is True
        assert rows[96].storage_path.endswith("checkpoints/step-000096")
        # The attempt starts from 96: its own progress is measured from there, not from 88.
        assert s.query(Job).filter_by(id=job_id).one().claimed_step == 96


def test_history_keeps_steps_before_the_resume_and_drops_those_redone(tmp_path):
    history = MetricsHistory(tmp_path)
    for step in range(1, 11):
        history.append({"step": step, "train_loss": 1.0 / step})
    history.truncate_after(6)  # the checkpoint the next run resumes from
    for step in range(7, 9):
        history.append({"step": step, "train_loss": 2.0})
    assert [r["step"] for r in history.rows()] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert history.rows()[6]["train_loss"] == 2.0


def test_a_failure_from_another_library_ends_the_job_with_one_of_our_codes(tmp_path):
    """SQLAlchemy's exceptions carry a `code` of their own (None for a StatementError); stored
    as the job's error code, None broke every read of the job (error.code is a string)."""
    from sqlalchemy.exc import StatementError

    from store.public import FineTuningJob, job_object
    from worker.runner import JobFailure, _fail

    settings = setup(tmp_path)
    failures = [(StatementError("bad value", "INSERT", {}, ValueError("nan")), "training_failed"),
                (JobFailure("too long", code="job_too_large"), "job_too_large"),
                (RuntimeError("boom"), "training_failed")]
    for error, code in failures:
        job_id = add_job(settings, status="running", worker_id="w")
        with session_scope(settings) as s:
            job = s.query(Job).filter_by(id=job_id).one()
        assert _fail(settings, job, "w", error) == "failed"
        with session_scope(settings) as s:
            shown = job_object(s.query(Job).filter_by(id=job_id).one())
        assert shown["error"]["code"] == code
        FineTuningJob.model_validate(shown)


def test_a_claim_the_database_never_answered_puts_the_message_back(monkeypatch):
    """The job's message is its only one (recorded as sent). A claim that gave up on the
    database used to fail the task, whose message was then acknowledged: the job stayed queued
    with no worker coming. Now the task puts a copy back, and the next delivery claims."""
    from sqlalchemy.exc import OperationalError

    import worker.runner as runner
    from worker.app import run_job_task

    deliveries = []

    def claim(settings, job_id, worker_id):
        deliveries.append(job_id)
        if len(deliveries) == 1:
            raise OperationalError("UPDATE jobs", {}, ConnectionError("server closed"))
        return None  # the next delivery finds the job (say) taken meanwhile

    monkeypatch.setattr(runner, "_claim", claim)
    monkeypatch.setattr(runner, "with_db_retry", lambda fn, what: fn())  # not 600 s of tries
    result = run_job_task.apply(args=["ftjob-stranded"])  # eager: a retry runs at once
    assert deliveries == ["ftjob-stranded", "ftjob-stranded"]
    assert result.successful(), result.traceback


@pytest.mark.slow
def test_a_worker_whose_job_was_taken_abandons_it_without_writing_to_it(tmp_path,
                                                                         builtin_world):
    """A worker's beats went stale (a database outage, say) and the reaper gave its job to
    another worker. When it notices, it must leave the job alone. It used to stop the trainer
    gracefully, which saved a checkpoint into the folder the new owner trains in, recorded it,
    and logged 'training cancelled' on the new owner's job."""
    import threading
    import time

    from store.models import JobEvent, StoredFile, Tenant
    from trainer.spec import TrainSpec
    from worker.runner import run_job

    settings = setup(tmp_path, heartbeat_seconds=0.2)
    artifacts = ArtifactStore(settings.artifacts_dir)
    data = "\n".join((builtin_world / "train.jsonl").read_text().splitlines()[:64]).encode()
    spec = TrainSpec.model_validate({
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 400, "batch_size": 32}}},
        "evaluation": {"max_known_facts": 50}})
    with session_scope(settings) as s:
        tenant = s.query(Tenant).one()
        path = artifacts.file_path(tenant.id, "file-taken")
        artifacts.write_bytes(path, data)
        s.add(StoredFile(id="file-taken", tenant_id=tenant.id, filename="t.jsonl",
                         purpose="fine-tune", bytes=len(data), sha256="-", lines=64,
                         storage_path=path))
        job = Job(tenant_id=tenant.id, model="driftsafe-factlm-tiny", training_file="file-taken",
                  spec=spec.model_dump(mode="json"), status="queued", total_steps=800)
        s.add(job)
        s.flush()
        job_id, job_dir = job.id, artifacts.path(artifacts.job_dir(tenant.id, job.id))
    ended = {}
    worker = threading.Thread(target=lambda: ended.update(status=run_job(settings, job_id, "w1")))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # training, not yet at its first checkpoint (step 200)
        with session_scope(settings) as s:
            progress = s.query(Job).filter_by(id=job_id).one().progress
        if progress and progress["step"] >= 3:
            break
        time.sleep(0.05)
    with session_scope(settings) as s:  # the reaper requeued it and w2 claimed it
        s.query(Job).filter_by(id=job_id).update({"worker_id": "w2", "attempts": 2})
    worker.join(120)
    assert ended == {"status": "lost"}
    with session_scope(settings) as s:
        row = s.query(Job).filter_by(id=job_id).one()
        assert (row.status, row.worker_id) == ("running", "w2")
        assert s.query(Checkpoint).filter_by(job_id=job_id).count() == 0
        messages = [e.message for e in s.query(JobEvent).filter_by(job_id=job_id)]
    assert not any("cancelled" in m or "failed" in m.lower() for m in messages), messages
    assert not list((job_dir / "checkpoints").glob("step-*")), "w1 saved into w2's folder"
