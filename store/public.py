"""The public shape of a fine-tuning job: what the API returns and what webhooks carry.

It lives in the store so that the API and the worker build it from the same row with the same code,
and the worker never imports the API. Torch-free (trainer.spec is plain pydantic).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from store.jobstate import JobStatus
from store.models import Job
from trainer.spec import Method

REPORT_KEYS = ("base_heldout_known_accuracy", "heldout_known_accuracy", "forgetting",
               "hallucination_rate", "new_fact_accuracy", "task_accuracy", "output_drift",
               "knowledge_categories", "max_forgetting", "drift_safe", "representation_drift",
               "forgetting_seen_entities", "forgetting_unseen_entities",
               "heldout_known_accuracy_seen_entities", "heldout_known_accuracy_unseen_entities",
               "base_heldout_known_accuracy_seen_entities",
               "base_heldout_known_accuracy_unseen_entities",
               "heldout_known_facts_seen_entities", "heldout_known_facts_unseen_entities",
               "heldout_known_facts_used", "heldout_known_facts_dropped_in_training")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int
    total_steps: int
    epoch: float
    seconds_remaining: float | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    status: JobStatus
    fine_tuned_model: str | None
    organization_id: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    estimated_finish: int | None
    metadata: dict[str, str] | None
    integrations: list[dict]
    user_provided_suffix: str | None
    adapter: dict[str, Any] = Field(description="driftsafe: the adapter, as resolved")
    evaluation: dict[str, Any] = Field(description="driftsafe: settings and known-fact report")
    progress: Progress | None = Field(description="driftsafe: while running")
    cancel_requested: bool = Field(description="driftsafe: cancel asked, job stops at next step")
    preset: str | None = Field(None, description="driftsafe: the preset that filled the method")



_NO_REPORT = dict.fromkeys(REPORT_KEYS)  # a job not yet scored: every report key is null


def _openai_hyperparameters(job: Job) -> dict:
    # A spec stored by the API was dumped from a validated TrainSpec, so its block is complete
    # as it is (validating it again on every read cost more than the read's query).
    method = job.spec["method"]
    hp = (job.hyperparameters or (method.get(method["type"]) or {}).get("hyperparameters")
          or Method.model_validate(method).hyperparameters.model_dump())
    return {**hp, "learning_rate_multiplier": hp.get("learning_rate_multiplier") or "auto"}


def error_code(code: object) -> str:
    """A job's error.code, always one of ours: other libraries' exceptions carry a `code` of
    their own (SQLAlchemy's: None or "9h9h"), and jobs failed before the worker kept to this
    may hold one."""
    return code if isinstance(code, str) and code else "training_failed"


def _error(e: dict) -> dict:
    return {"code": error_code(e.get("code")), "message": e["message"], "param": e.get("param")}


def _progress(p: dict) -> dict:
    left = p.get("seconds_remaining")
    return {"step": int(p["step"]), "total_steps": int(p["total_steps"]),
            "epoch": float(p["epoch"]), "seconds_remaining": None if left is None else float(left)}


def job_object(job: Job) -> dict:
    """The job as `FineTuningJob` describes it, built as a plain dict: the row's values are ours
    (written by the API and the worker), and validating them into the model and dumping it again
    was most of a list request's cost. tests/api check this against the model for every status."""
    spec = job.spec
    method = {k: v for k, v in spec["method"].items() if v is not None}
    if job.hyperparameters:
        method[method["type"]] = {"hyperparameters": job.hyperparameters}
    report = job.evaluation
    evaluation = {**spec.get("evaluation", {}),
                  **({k: report.get(k) for k in REPORT_KEYS} if report else _NO_REPORT)}
    if evaluation.get("max_forgetting") is None:
        evaluation["max_forgetting"] = spec.get("evaluation", {}).get("max_forgetting")
    error, progress = job.error, job.progress
    return {
        "id": job.id, "object": "fine_tuning.job", "model": job.model,
        "created_at": job.created_at, "finished_at": job.finished_at, "status": job.status,
        "fine_tuned_model": job.fine_tuned_model, "organization_id": job.tenant_id,
        "training_file": job.training_file, "validation_file": job.validation_file,
        "hyperparameters": _openai_hyperparameters(job), "method": method,
        "result_files": job.result_files or [], "trained_tokens": job.trained_tokens,
        "error": _error(error) if error else None,
        "seed": spec["seed"], "estimated_finish": job.estimated_finish,
        "metadata": job.job_metadata, "integrations": [], "user_provided_suffix": job.suffix,
        "adapter": spec["adapter"], "evaluation": evaluation,
        "progress": (_progress(progress) if progress and job.status == JobStatus.RUNNING
                     else None),
        "cancel_requested": job.cancel_requested, "preset": spec.get("preset"),
    }
