"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints, adapter downloads."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api.deps import ArtifactsDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.idempotency import IdempotencyDep
from api.models_registry import known_model_ids
from api.schemas import (FineTuningJob, JobCreate, ListOf, checkpoint_object, event_object,
                         job_object)
from api.tenancy import Scoped, list_body
from store.models import Checkpoint, Job, JobEvent, StoredFile
from store.queue import enqueue_job
from trainer.spec import Method, TrainSpec

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
FINISHED = ("succeeded", "failed", "cancelled")


def _training_spec(body: JobCreate) -> TrainSpec:
    if body.method is not None and body.hyperparameters is not None:
        raise APIError(400, "Give hyperparameters inside method, not both at the top level and "
                            "in method.", param="hyperparameters")
    method = body.method or Method(type="supervised", supervised={
        "hyperparameters": body.hyperparameters or {}})
    return TrainSpec(method=method, adapter=body.adapter, evaluation=body.evaluation,
                     seed=body.seed if body.seed is not None else int(time.time()) % 2**31)


def _file_for(scoped: Scoped, file_id: str | None, param: str, *, qa_only: bool = False):
    if file_id is None:
        return None
    row = scoped.find(StoredFile, file_id)
    if row is None:
        raise APIError(400, f"No file with id '{file_id}' (upload it with purpose fine-tune).",
                       param=param, code="invalid_file")
    if row.purpose != "fine-tune":
        raise APIError(400, f"File '{file_id}' has purpose '{row.purpose}', not 'fine-tune'.",
                       param=param, code="invalid_file")
    if qa_only and not row.qa_only:
        raise APIError(400, f"File '{file_id}' must hold QA lines only (question and answer) to "
                            "be scored as known facts.", param=param, code="invalid_file")
    return row


@router.post("/jobs", response_model=FineTuningJob, summary="Create a fine-tuning job")
def create_job(body: JobCreate, request: Request, session: SessionDep, tenant: CurrentTenant,
               settings: SettingsDep, idem: IdempotencyDep):
    def produce() -> JSONResponse:
        if body.model not in known_model_ids(settings):
            raise APIError(400, f"Unknown model '{body.model}'; GET /v1/models lists the models "
                                "this service can fine-tune.", param="model", code="model_not_found")
        spec = _training_spec(body)
        scoped = Scoped(session, tenant)
        _file_for(scoped, body.training_file, "training_file")
        _file_for(scoped, body.validation_file, "validation_file")
        _file_for(scoped, body.evaluation.known_facts_file, "evaluation.known_facts_file",
                  qa_only=True)
        job = Job(tenant_id=tenant.id, model=body.model, training_file=body.training_file,
                  validation_file=body.validation_file,
                  known_facts_file=body.evaluation.known_facts_file,
                  spec=spec.model_dump(mode="json"), suffix=body.suffix,
                  job_metadata=body.metadata, status="queued", enqueued_at=time.time())
        session.add(job)
        session.flush()
        session.add(JobEvent(tenant_id=tenant.id, job_id=job.id, level="info",
                             message=f"Created fine-tuning job: {job.id}"))
        session.commit()
        # The row is committed first: the message only wakes a worker, which reads the row.
        enqueue_job(request.app.state.celery, job.id)
        return JSONResponse(job_object(job))

    return idem.run(body.model_dump(mode="json"), produce)


@router.get("/jobs", response_model=ListOf, summary="List fine-tuning jobs")
def list_jobs(request: Request, session: SessionDep, tenant: CurrentTenant,
              after: str | None = None, limit: int = 20, status: str | None = None):
    scoped = Scoped(session, tenant)
    query = scoped.select(Job)
    if status:
        query = query.where(Job.status == status)
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
              if k.startswith("metadata[") and k.endswith("]")}
    if wanted:
        # Metadata is JSON without a portable index: filter in Python over this tenant's jobs.
        rows = [j for j in session.scalars(query.order_by(Job.seq.desc()))
                if all((j.job_metadata or {}).get(k) == v for k, v in wanted.items())]
        if after:
            ids = [j.id for j in rows]
            if after not in ids:
                raise APIError(400, f"No job with id '{after}' to page after.", param="after")
            rows = rows[ids.index(after) + 1:]
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be between 1 and 100.", param="limit")
        return list_body([job_object(j) for j in rows[:limit]], len(rows) > limit)
    rows, more = scoped.page(query, Job, after=after, limit=limit)
    return list_body([job_object(j) for j in rows], more)


@router.get("/jobs/{job_id}", response_model=FineTuningJob, summary="Retrieve a job")
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant):
    return job_object(Scoped(session, tenant).get(Job, job_id, "fine-tuning job"))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a job")
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant, idem: IdempotencyDep):
    def produce() -> JSONResponse:
        job = Scoped(session, tenant).get(Job, job_id, "fine-tuning job")
        if job.status in FINISHED:
            raise APIError(409, f"Job '{job_id}' has already {job.status}; only queued or running "
                                "jobs can be cancelled.", code="job_finished")
        if job.status == "running":
            job.cancel_requested = True  # the worker stops at its next step and ends the job
            message = "Cancellation requested; the job stops at its next step."
        else:
            job.status, job.finished_at, job.cancel_requested = "cancelled", int(time.time()), True
            message = "Job cancelled before it started."
        session.add(JobEvent(tenant_id=tenant.id, job_id=job.id, level="info", message=message))
        session.commit()
        return JSONResponse(job_object(job))

    return idem.run({"cancel": job_id}, produce)


@router.get("/jobs/{job_id}/events", response_model=ListOf, summary="List a job's events")
def list_events(job_id: str, session: SessionDep, tenant: CurrentTenant,
                after: str | None = None, limit: int = 20):
    scoped = Scoped(session, tenant)
    scoped.get(Job, job_id, "fine-tuning job")
    rows, more = scoped.page(scoped.select(JobEvent).where(JobEvent.job_id == job_id), JobEvent,
                             after=after, limit=limit)
    return list_body([event_object(e) for e in rows], more)


@router.get("/jobs/{job_id}/checkpoints", response_model=ListOf,
            summary="List a job's checkpoints")
def list_checkpoints(job_id: str, session: SessionDep, tenant: CurrentTenant,
                     after: str | None = None, limit: int = 10):
    scoped = Scoped(session, tenant)
    job = scoped.get(Job, job_id, "fine-tuning job")
    rows, more = scoped.page(scoped.select(Checkpoint).where(Checkpoint.job_id == job_id),
                             Checkpoint, after=after, limit=limit)
    return list_body([checkpoint_object(c, job) for c in rows], more)


@router.get("/jobs/{job_id}/adapter", summary="Download the job's adapter (zip)",
            responses={200: {"content": {"application/zip": {}}}})
def job_adapter(job_id: str, session: SessionDep, tenant: CurrentTenant, artifacts: ArtifactsDep,
                select: str | None = Query(None, pattern="^(latest|drift_safe)$")):
    from api.adapters import adapter_response, pick_checkpoint

    scoped = Scoped(session, tenant)
    job = scoped.get(Job, job_id, "fine-tuning job")
    ckpt = pick_checkpoint(session, scoped, job, select or "latest")
    return adapter_response(artifacts, job, ckpt)


@router.get("/checkpoints/{checkpoint_id}/adapter", summary="Download a checkpoint's adapter",
            responses={200: {"content": {"application/zip": {}}}})
def checkpoint_adapter(checkpoint_id: str, session: SessionDep, tenant: CurrentTenant,
                       artifacts: ArtifactsDep):
    from api.adapters import adapter_response

    scoped = Scoped(session, tenant)
    ckpt = scoped.get(Checkpoint, checkpoint_id, "checkpoint")
    return adapter_response(artifacts, scoped.get(Job, ckpt.job_id, "fine-tuning job"), ckpt)


