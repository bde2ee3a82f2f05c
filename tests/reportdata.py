"""Jobs as a worker leaves them, written straight into the store: a finished job with its
scores, losses and checkpoints, or a running one whose progress a test advances. No training:
the report tests need the rows, not the model. Curves are shaped like the bench's LoRA runs
(SFT forgets about 40 points, self-distillation about 8; both learn every new fact).
"""

from __future__ import annotations

import math

from store.db import session_scope
from store.jobstate import JobStatus
from store.keys import create_key, create_tenant
from store.models import Checkpoint, Job, JobEvent, by_public_id, now
from trainer.spec import Method, TrainSpec

BASE_ACCURACY = 0.998
BUDGET = 0.05
CATEGORIES = {"HighlyKnown": 590, "MaybeKnown": 10, "WeaklyKnown": 3, "Unknown": 597}
FINAL_FORGETTING = {"supervised": 0.413, "self_distillation": 0.081, "frozen_groups": 0.25}
LOSS_EVERY, SCORE_EVERY = 10, 50


def new_tenant(settings, name: str) -> tuple[str, str]:
    """(tenant id, API key)."""
    with session_scope(settings) as s:
        tenant = create_tenant(s, name)
        _, key = create_key(s, settings.hmac_key(), tenant)
        return tenant.id, key


def scores_at(method: str, step: int, total: int) -> dict:
    """What a checkpoint at `step` measures: new facts learned fast, old ones forgotten slowly."""
    done = step / total
    forgetting = round(FINAL_FORGETTING[method] * done ** 1.3, 4)
    return {"new_fact_accuracy": round(1 - math.exp(-6 * done), 4),
            "heldout_known_accuracy": round(BASE_ACCURACY - forgetting, 4),
            "base_heldout_known_accuracy": BASE_ACCURACY, "forgetting": forgetting,
            "hallucination_rate": round(0.6 * forgetting, 4), "max_forgetting": BUDGET,
            "drift_safe": forgetting <= BUDGET}


def losses_at(method: str, step: int) -> dict:
    out = {"train_loss": round(2.5 * math.exp(-step / 40) + 0.05, 4)}
    if method == "self_distillation":
        out["distill_loss"] = round(0.02 + 0.3 * (1 - math.exp(-step / 60)), 4)
    return out


def add_job(settings, tenant_id: str, method: str = "supervised", *, total_steps: int = 200,
            running_at: int | None = None, suffix: str | None = None,
            metadata: dict | None = None) -> str:
    """A succeeded job, or (running_at=step) one running at that step. Returns its id."""
    block = {"trainable": ["attention"]} if method == "frozen_groups" else {}
    spec = TrainSpec(method=Method.model_validate(
        {"type": method, method: {"hyperparameters": {"n_epochs": 20, "batch_size": 32,
                                                      "learning_rate": 1e-3, **block}}}),
        seed=0)
    with session_scope(settings) as s:
        job = Job(tenant_id=tenant_id, model="driftsafe-factlm-tiny", training_file="file-x",
                  spec=spec.model_dump(mode="json"), suffix=suffix, job_metadata=metadata,
                  status=JobStatus.RUNNING, total_steps=total_steps, started_at=now())
        s.add(job)
        s.flush()
        job_id = job.id
    advance(settings, job_id, running_at if running_at is not None else total_steps)
    if running_at is None:
        finish(settings, job_id)
    return job_id


def advance(settings, job_id: str, step: int) -> None:
    """Move a running job to `step`: progress, and the events and checkpoints up to it."""
    with session_scope(settings) as s:
        job = by_public_id(s, Job, job_id)
        method, total = job.spec["method"]["type"], job.total_steps
        before = (job.progress or {}).get("step", 0)
        for at in range(before + 1, step + 1):
            if at % LOSS_EVERY == 0 or at == total:
                data = {"step": at, "total_steps": total, "epoch": at / 10,
                        **losses_at(method, at)}
                s.add(JobEvent(tenant_id=job.tenant_id, job_id=job_id, type="metrics", data=data,
                               message=f"Step {at}/{total}: training loss={data['train_loss']}"))
            if at % SCORE_EVERY == 0 or at == total:
                scores = scores_at(method, at, total)
                s.add(JobEvent(tenant_id=job.tenant_id, job_id=job_id, type="metrics",
                               message=f"Checkpoint at step {at}",
                               data={"step": at, "known_accuracy":
                                     scores["heldout_known_accuracy"], **scores}))
                s.add(Checkpoint(tenant_id=job.tenant_id, job_id=job_id, step_number=at,
                                 metrics=scores, drift_safe=scores["drift_safe"],
                                 storage_path=f"nowhere/{job_id}/{at}"))
        job.progress = {"step": step, "total_steps": total, "epoch": step / 10,
                        "seconds_remaining": float(total - step)}


def finish(settings, job_id: str) -> None:
    with session_scope(settings) as s:
        job = by_public_id(s, Job, job_id)
        method = job.spec["method"]["type"]
        job.status, job.finished_at = JobStatus.SUCCEEDED, now()
        job.fine_tuned_model = f"ft:{job.model}:{job.tenant_id}:{job.id}"
        job.evaluation = {**scores_at(method, job.total_steps, job.total_steps),
                          "task_accuracy": 1.0, "output_drift": 0.1,
                          "knowledge_categories": CATEGORIES}
        s.add(JobEvent(tenant_id=job.tenant_id, job_id=job_id,
                       message="The job has successfully completed"))
