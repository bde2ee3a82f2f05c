"""Wire objects: OpenAI's shapes plus driftsafe's extensions, and the functions that build them
from rows. Request bodies reuse the trainer's own spec classes (torch-free), so what the API
accepts is exactly what the trainer runs."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from api.errors import APIError
from store.models import Checkpoint, Job, JobEvent, StoredFile, WebhookEndpoint
from store.public import REPORT_KEYS, FineTuningJob, JobError, Progress, job_object  # noqa: F401
from trainer.spec import (
    NO_CONTROL_CHARS,
    AdapterSpec,
    EvaluationSpec,
    Method,
    SupervisedHyperparameters,
)

# Every constraint is one JSON Schema can state, so /openapi.json is exactly as strict as
# validation. Strings that reach a query never hold control characters (PostgreSQL cannot even
# take a NUL), and a pattern also turns away lone surrogates, which cannot be encoded.
ObjectId = Annotated[str, Path(min_length=1, pattern=NO_CONTROL_CHARS,
                               description="The object's id (another tenant's objects: 404).")]
PageAfter = Annotated[str | None, Query(min_length=1, pattern=NO_CONTROL_CHARS,
                                        description="Cursor: the id of the last object of the "
                                        "previous page (400 if none).")]
PageLimit = Annotated[int, Query(ge=1, le=100, description="Objects per page, 1 to 100.")]
TextFilter = Annotated[str | None, Query(pattern=NO_CONTROL_CHARS)]
# OpenAI's metadata limits. Spelled out for the document too: pydantic would put the key pattern
# in patternProperties, which leaves other keys unchecked in JSON Schema.
METADATA_PAIRS = 16
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64, pattern=NO_CONTROL_CHARS)],
         Annotated[str, Field(max_length=512, pattern=NO_CONTROL_CHARS)]],
    Field(max_length=METADATA_PAIRS),
    WithJsonSchema({"type": "object", "maxProperties": METADATA_PAIRS,
                    "propertyNames": {"maxLength": 64, "pattern": NO_CONTROL_CHARS},
                    "additionalProperties": {"type": "string", "maxLength": 512,
                                             "pattern": NO_CONTROL_CHARS}})]
FileRef = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_CONTROL_CHARS)]
_NO_CONTROL = re.compile(NO_CONTROL_CHARS)


async def metadata_filters(request: Request) -> dict[str, str]:
    """OpenAI's `metadata[key]=value` list filters, held to the limits of metadata itself (so a
    filter can name anything a job can carry, and nothing PostgreSQL cannot compare)."""
    filters = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata["):-1]
            if (not 1 <= len(key) <= 64 or len(value) > 512
                    or not _NO_CONTROL.fullmatch(key + value)):
                raise APIError(400, f"Invalid '{name}': a filter names its key, as in "
                                    "metadata[team]=search; keys are 1 to 64 characters, values "
                                    "at most 512, neither with control characters.",
                               param=name, code="invalid_value")
            filters[key] = value
    if len(filters) > METADATA_PAIRS:
        # More could never match (a job carries at most that many pairs), and each is another
        # condition: about 1,000 made SQLite refuse the query, which read as a database outage.
        raise APIError(400, f"At most {METADATA_PAIRS} metadata filters, one per key; got "
                            f"{len(filters)}.", param="metadata", code="invalid_value")
    return filters


# api.openapi documents a dependency's query parameters that FastAPI cannot see from here.
metadata_filters.openapi_parameters = [{
    "name": "metadata", "in": "query", "style": "deepObject", "explode": True,
    "description": "Only jobs whose metadata holds every pair given: metadata[team]=search.",
    "schema": {"type": "object", "maxProperties": METADATA_PAIRS,
               "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": NO_CONTROL_CHARS},
               "additionalProperties": {"type": "string", "maxLength": 512,
                                        "pattern": NO_CONTROL_CHARS}}}]

# What store.netguard.parse (httpx) accepts, as a pattern: http(s), an ASCII host name (its last
# label starts with a letter) or a dotted IPv4 address, no user:password@, a port in 1..65535, then
# no whitespace or control characters. That the host resolves to a public address (unless
# webhook_allow_private) is checked when registered and at every delivery: no pattern can say it.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_URL_CHAR = r"[^\x00-\x20\x7F-\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\uFEFF]"
WEBHOOK_URL_PATTERN = (rf"^https?://(?:(?:{_LABEL}\.)*{_TOP_LABEL}|{_OCTET}(?:\.{_OCTET}){{3}})"
                       rf"(?::{_PORT})?(?:[/?#]{_URL_CHAR}*)?$")


class JobCreate(BaseModel):
    # `hyperparameters` is the older form of `method`: both at once is refused (jobs route), and
    # so is either beside a preset that is not a self_distillation method (trainer.presets).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"not": {"required": ["hyperparameters", "method"],
                 "properties": {"hyperparameters": {"type": "object"},
                                "method": {"type": "object"}}}},
        {"not": {"required": ["hyperparameters", "preset"],
                 "properties": {"hyperparameters": {"type": "object"},
                                "preset": {"type": "string"}}}},
        {"if": {"required": ["preset", "method"],
                "properties": {"preset": {"type": "string"}, "method": {"type": "object"}}},
         "then": {"properties": {"method": {"properties": {
             "type": {"const": "self_distillation"}}}}}},
    ]})

    model: str = Field(..., min_length=1, max_length=200)
    training_file: FileRef
    validation_file: FileRef | None = None
    hyperparameters: SupervisedHyperparameters | None = Field(
        None, description="OpenAI's older top-level form: supervised hyperparameters.")
    method: Method | None = Field(None, description="supervised (default), self_distillation, "
                                                    "or frozen_groups, each with its own block.")
    preset: Literal["drift_safe"] | None = Field(
        None, description="driftsafe: a measured recipe that fills the method (drift_safe: "
                          "self-distillation tuned to forget least; README). Fields given in "
                          "method.self_distillation win over it.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec,
                                 description="driftsafe: LoRA or full.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec,
                                       description="driftsafe: known-fact scoring settings.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    metadata: Metadata | None = Field(
        None, description="Up to 16 pairs; keys at most 64 characters, values at most 512.")
    integrations: list[dict] | None = None


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


WebhookEvent = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed",
                       "fine_tuning.job.cancelled"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., pattern=WEBHOOK_URL_PATTERN, max_length=2000,
                     description="http(s) URL on a public address (the host must resolve to "
                                 "one when registered, and at every delivery).")
    events: list[WebhookEvent] | None = None


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[WebhookEvent]
    created_at: int
    secret: str | None = Field(None, description="The signing secret: only in the answer to "
                                                 "the POST that made the endpoint.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    broker: str


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
