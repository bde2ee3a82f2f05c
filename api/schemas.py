"""Wire objects: OpenAI's shapes plus driftsafe's extensions, and the functions that build them
from rows. Request bodies reuse the trainer's own spec classes (torch-free), so what the API
accepts is exactly what the trainer runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from store.models import Checkpoint, Job, JobEvent, StoredFile, WebhookEndpoint
from store.public import REPORT_KEYS, FineTuningJob, JobError, Progress, job_object  # noqa: F401
from trainer.spec import AdapterSpec, EvaluationSpec, Method, SupervisedHyperparameters

class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=200)
    training_file: str = Field(..., min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: SupervisedHyperparameters | None = Field(
        None, description="OpenAI's older top-level form: supervised hyperparameters.")
    method: Method | None = Field(None, description="supervised (default), self_distillation, "
                                                    "or frozen_groups, each with its own block.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="driftsafe: LoRA or full.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec,
                                       description="driftsafe: known-fact scoring settings.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v):
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 metadata keys")
        for k, val in v.items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    lines: int = Field(description="driftsafe: examples in the file")


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, Any]


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ListOf(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., pattern=r"^https?://", max_length=2000)
    events: list[Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed",
                         "fine_tuning.job.cancelled"]] | None = None


def file_object(f: StoredFile) -> dict:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename,
                      purpose=f.purpose, status=f.status, lines=f.lines).model_dump()


def event_object(e: JobEvent) -> dict:
    return JobEventObject(id=e.id, created_at=e.created_at, level=e.level, message=e.message,
                          type=e.type, data=e.data).model_dump()


def checkpoint_object(c: Checkpoint, job: Job) -> dict:
    name = f"{job.fine_tuned_model or 'ft:' + job.model + ':' + job.id}:ckpt-step-{c.step_number}"
    return CheckpointObject(id=c.id, created_at=c.created_at, fine_tuning_job_id=c.job_id,
                            step_number=c.step_number, fine_tuned_model_checkpoint=name,
                            metrics={**c.metrics, "step": c.step_number,
                                     "drift_safe": c.drift_safe}).model_dump()


def webhook_object(w: WebhookEndpoint, secret: str | None = None) -> dict:
    out = {"id": w.id, "object": "webhook_endpoint", "url": w.url, "events": w.events,
           "created_at": w.created_at}
    if secret is not None:
        out["secret"] = secret  # shown once, when made
    return out
