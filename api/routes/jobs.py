"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints, adapter downloads."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import bindparam, exists, func, select, update

from api.bulk import on_bulk_threads
from api.deps import ArtifactsDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import APIError
from api.idempotency import IdempotencyDep, JSONBody
from api.models_registry import BUILTIN_MODEL_ID, known_model_ids
from api.responses import JSONResponse, download_responses
from api.schemas import (
    FineTuningJob,
    JobCreate,
    ListOf,
    ObjectId,
    PageAfter,
    PageLimit,
    checkpoint_object,
    event_object,
    job_object,
    metadata_filters,
)
from api.tenancy import Scoped, list_body
from store.jobstate import ACTIVE, FINISHED, JobStatus, add_event, event_values, transition
from store.models import Checkpoint, Job, JobEvent, StoredFile, by_public_id, new_id, now
from store.writes import as_written
from trainer.modelfacts import (
    TiedEmbeddingsError,
    auto_size,
    check_tied_selection,
    tied_in_config,
)
from trainer.presets import PresetConflict, apply_preset, preset_evaluation
from trainer.spec import Method, TrainSpec, resolve_auto

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


def _training_spec(body: JobCreate) -> TrainSpec:
    if body.method is not None and body.hyperparameters is not None:
        raise APIError(400, "Give hyperparameters inside method, not both at the top level and "
                            "in method.", param="hyperparameters")
    evaluation = body.evaluation
    if body.preset is not None:
        if body.hyperparameters is not None:
            raise APIError(400, f"preset '{body.preset}' fills the method; give hyperparameters "
                                "inside method.self_distillation to override it.",
                           param="hyperparameters")
        try:
            method = apply_preset(body.preset, body.method, body.adapter.type)
        except PresetConflict as e:
            raise APIError(400, f"{e}.", param="preset") from None
        evaluation = preset_evaluation(evaluation)
    else:
        method = body.method or Method(type="supervised", supervised={
            "hyperparameters": body.hyperparameters or {}})
    return TrainSpec(method=method, adapter=body.adapter, evaluation=evaluation,
                     preset=body.preset,
                     seed=body.seed if body.seed is not None else int(time.time()) % 2**31)


def _checked_file(row, file_id: str, param: str, *, qa_only: bool = False):
    """`row`: a StoredFile, or a row of its purpose, lines and qa_only; None if not found."""
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


def _file_for(scoped: Scoped, file_id: str | None, param: str, *, qa_only: bool = False):
    if file_id is None:
        return None
    return _checked_file(scoped.find(StoredFile, file_id), file_id, param, qa_only=qa_only)


def _check_tied_embeddings(spec: TrainSpec, model: str, model_dir: str | None) -> None:
    """A registered model's config.json is at hand: a full fine-tuning selection naming one side
    of tied embeddings is refused now, not when a worker loads the model (which checks again, and
    is the only check for the built-in model)."""
    if model_dir is None or spec.method.type != "frozen_groups":
        return
    try:
        check_tied_selection(tied_in_config(model_dir), spec.method.hyperparameters.groups(),
                             spec.adapter.type)
    except TiedEmbeddingsError as e:
        raise APIError(400, f"Model '{model}': {e}.",
                       param="method.frozen_groups.hyperparameters.trainable",
                       code=e.code) from None


def _planned_steps(spec: TrainSpec, examples: int, settings, model_dir: str | None) -> int:
    """Optimizer steps the job will take, checked against the cap before anything is queued.
    "auto" resolves as the worker will resolve it: by the registered model's size (read off its
    config.json), the built-in model (`model_dir` None) by its own defaults."""
    size = auto_size(model_dir) if model_dir is not None else None
    hp = resolve_auto(spec, examples, size).method.hyperparameters
    batches = math.ceil(examples / hp.batch_size)
    steps = hp.n_epochs * batches
    if steps > settings.max_job_steps:
        block = f"method.{spec.method.type}.hyperparameters"
        raise APIError(400, f"The job would take {steps} steps ({hp.n_epochs} epochs x "
                            f"{batches} batches of {hp.batch_size}); "
                            f"the cap is max_job_steps={settings.max_job_steps}. Use fewer "
                            "epochs or a larger batch.", param=f"{block}.n_epochs",
                       code="job_too_large")
    return steps


# Every creation reads its training file and, under a quota, the tenant's active jobs: one round
# trip, of the columns the checks use only (a row, not an ORM object: no identity map, no
# instance). The count stops at the quota: it only has to tell whether the tenant is at it, and an
# unbounded count read every queued row of a backlog on every creation (1 ms at 3,000 rows here).
# Built once: every creation runs one of them.
ACTIVE_JOBS_UP_TO_CAP = select(func.count()).select_from(
    select(Job.seq).where(Job.tenant_id == bindparam("tenant_id"), Job.status.in_(ACTIVE))
    .limit(bindparam("cap")).subquery())
_TRAINING_FILE = (StoredFile.purpose, StoredFile.lines, StoredFile.qa_only)
_OF_TENANT = (StoredFile.tenant_id == bindparam("tenant_id"), StoredFile.id == bindparam("id"))
TRAINING_FILE_AND_ACTIVE_JOBS = select(
    *_TRAINING_FILE, ACTIVE_JOBS_UP_TO_CAP.scalar_subquery().label("active")).where(*_OF_TENANT)
TRAINING_FILE = select(*_TRAINING_FILE).where(*_OF_TENANT)


def _training_file_and_active_jobs(session, tenant, file_id: str, cap: int):
    """(the training file's purpose, lines and qa_only, or None; the tenant's active jobs,
    counted up to `cap`, 0 if `cap` is 0: no quota)."""
    params = {"tenant_id": tenant.id, "id": file_id}
    # On the session's connection: plain columns need none of the ORM's statement handling, which
    # was half of this read's interpreter time.
    if not cap:
        return session.connection().execute(TRAINING_FILE, params).first(), 0
    found = session.connection().execute(TRAINING_FILE_AND_ACTIVE_JOBS,
                                         params | {"cap": cap}).first()
    return (found, found.active) if found else (None, 0)


def _check_running_quota(active: int, settings) -> None:
    if settings.max_running_jobs and active >= settings.max_running_jobs:
        raise APIError(429, f"This organization already has {active} queued or running jobs; the "
                            f"limit is max_running_jobs={settings.max_running_jobs}. Wait for "
                            "one to finish or cancel one.", type="rate_limit_error",
                       code="quota_running_jobs", headers={"Retry-After": "60"})


@router.post("/jobs", response_model=FineTuningJob, summary="Create a fine-tuning job")
def create_job(body: JobCreate, idem: IdempotencyDep):
    session, tenant, settings = idem.session, idem.tenant, idem.settings

    def produce() -> JSONResponse:
        if body.model not in known_model_ids(settings):
            raise APIError(400, f"Unknown model '{body.model}'; GET /v1/models lists the models "
                                "this service can fine-tune.", param="model",
                           code="model_not_found")
        spec = _training_spec(body)
        # None: the built-in model (which the worker loads whatever DRIFTSAFE_MODELS says)
        model_dir = None if body.model == BUILTIN_MODEL_ID else settings.models.get(body.model)
        _check_tied_embeddings(spec, body.model, model_dir)
        scoped = Scoped(session, tenant)
        if settings.max_running_jobs:
            scoped.take_turns()  # concurrent creations cannot overshoot the quota
        found, active = _training_file_and_active_jobs(session, tenant, body.training_file,
                                                       settings.max_running_jobs)
        training = _checked_file(found, body.training_file, "training_file")
        _file_for(scoped, body.validation_file, "validation_file")
        _file_for(scoped, body.evaluation.known_facts_file, "evaluation.known_facts_file",
                  qa_only=True)
        steps = _planned_steps(spec, training.lines, settings, model_dir)
        _check_running_quota(active, settings)
        # Plain rows with every column given: with the event and the idempotency record they
        # are one atomic INSERT at commit (store.writes); `job` only shapes the response.
        values = dict(id=new_id("ftjob-"), created_at=now(), tenant_id=tenant.id,
                      model=body.model, training_file=body.training_file,
                      validation_file=body.validation_file,
                      known_facts_file=body.evaluation.known_facts_file,
                      spec=spec.model_dump(mode="json"), suffix=body.suffix,
                      job_metadata=body.metadata, status=JobStatus.QUEUED.value,
                      total_steps=steps, cancel_requested=False, result_files=[], attempts=0,
                      lost_without_progress=0)
        job = as_written(Job, values)
        idem.insert(Job, values)
        idem.insert(JobEvent, event_values(job, f"Created fine-tuning job: {job.id}"))
        # The committed row, queued with no message recorded, is all a worker needs: a worker's
        # relay sends its message (worker/relay.py), and the API never talks to the broker.
        return JSONBody(job_object(job))

    # Without a quota to hold, the creation is reads then one atomic INSERT, in autocommit.
    return idem.run(body.model_dump(mode="json"), produce,
                    reads_then_inserts=not settings.max_running_jobs)


def _metadata_is(session, key: str, value: str):
    """metadata[key] == value, filtered in the query: a JSON lookup (->>) on PostgreSQL; on
    SQLite through json_each, since a SQLite JSON path cannot name a key holding a double quote
    (such a filter found nothing there)."""
    if session.get_bind().dialect.name == "sqlite":
        pairs = func.json_each(Job.job_metadata).table_valued("key", "value")
        return exists().where(pairs.c.key == key, pairs.c.value == value)
    return Job.job_metadata[key].as_string() == value


@router.get("/jobs", response_model=ListOf, summary="List fine-tuning jobs",
            dependencies=[Depends(metadata_filters)])
def list_jobs(request: Request, session: SessionDep, tenant: CurrentTenant,
              after: PageAfter = None, limit: PageLimit = 20, status: JobStatus | None = None):
    scoped = Scoped(session, tenant)
    query = scoped.select(Job)
    if status:
        query = query.where(Job.status == status)
    for k, v in request.query_params.items():
        if k.startswith("metadata[") and k.endswith("]"):
            query = query.where(_metadata_is(session, k[len("metadata["):-1], v))
    rows, more = scoped.page(query, Job, after=after, limit=limit)
    return JSONResponse(list_body([job_object(j) for j in rows], more))


@router.get("/jobs/{job_id}", response_model=FineTuningJob, summary="Retrieve a job")
def get_job(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant):
    # A ready JSONResponse: job_object builds exactly what response_model describes (tests/api
    # hold it to the model), so FastAPI's validation of it would be pure cost on the hottest route.
    return JSONResponse(job_object(Scoped(session, tenant).get(Job, job_id, "fine-tuning job")))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a job",
             responses={409: {"description": "The job has already finished"}})
def cancel_job(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant, idem: IdempotencyDep):
    def produce() -> JSONResponse:
        Scoped(session, tenant).get(Job, job_id, "fine-tuning job")  # 404 for other tenants
        # Guarded writes: a job claimed between our read and our write is cancelled as running,
        # and one the reaper put back in the queue meanwhile as queued (hence the tries).
        for _ in range(3):
            job = transition(session, job_id, JobStatus.CANCELLED, leaving=[JobStatus.QUEUED],
                             values={"cancel_requested": True},
                             message="Job cancelled before it started.")
            if job is not None:
                return JSONResponse(job_object(job))
            # running (the worker stops at its next step), or already finished
            flagged = session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(cancel_requested=True)).rowcount == 1
            job = by_public_id(session, Job, job_id)
            session.refresh(job)
            if flagged:
                add_event(session, job, "Cancellation requested; the job stops at its next step.")
                return JSONResponse(job_object(job))
            if job.status in FINISHED:
                break
        raise APIError(409, f"Job '{job_id}' has already {job.status}; only queued or "
                            "running jobs can be cancelled.", code="job_finished")

    return idem.run({"cancel": job_id}, produce)


@router.get("/jobs/{job_id}/events", response_model=ListOf, summary="List a job's events")
def list_events(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                after: PageAfter = None, limit: PageLimit = 20):
    scoped = Scoped(session, tenant)
    scoped.get(Job, job_id, "fine-tuning job")
    rows, more = scoped.page(scoped.select(JobEvent).where(JobEvent.job_id == job_id), JobEvent,
                             after=after, limit=limit)
    return JSONResponse(list_body([event_object(e) for e in rows], more))


@router.get("/jobs/{job_id}/checkpoints", response_model=ListOf,
            summary="List a job's checkpoints")
def list_checkpoints(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                     after: PageAfter = None, limit: PageLimit = 10):
    scoped = Scoped(session, tenant)
    job = scoped.get(Job, job_id, "fine-tuning job")
    rows, more = scoped.page(scoped.select(Checkpoint).where(Checkpoint.job_id == job_id),
                             Checkpoint, after=after, limit=limit)
    return JSONResponse(list_body([checkpoint_object(c, job) for c in rows], more))


@router.get("/jobs/{job_id}/adapter", summary="Download the job's adapter (zip)",
            responses={**download_responses("application/zip"),
                       404: {"description": "No such job, no adapter yet, or (select=drift_safe) "
                                            "no checkpoint within the forgetting budget"}})
async def job_adapter(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                      artifacts: ArtifactsDep, settings: SettingsDep,
                      select: str | None = Query(None, pattern="^(latest|drift_safe)$")):
    # A first download builds the zip (a full model's weights: seconds): on the bulk threads.
    return await on_bulk_threads(settings, _job_adapter, job_id, session, tenant, artifacts,
                                 select or "latest")


def _job_adapter(job_id: str, session, tenant, artifacts, select: str):
    from api.adapters import adapter_response, pick_checkpoint

    scoped = Scoped(session, tenant)
    job = scoped.get(Job, job_id, "fine-tuning job")
    ckpt = pick_checkpoint(session, scoped, job, select)
    return adapter_response(artifacts, job, ckpt)


@router.get("/checkpoints/{checkpoint_id}/adapter", summary="Download a checkpoint's adapter",
            responses=download_responses("application/zip"))
async def checkpoint_adapter(checkpoint_id: ObjectId, session: SessionDep,
                             tenant: CurrentTenant, artifacts: ArtifactsDep,
                             settings: SettingsDep):
    return await on_bulk_threads(settings, _checkpoint_adapter, checkpoint_id, session, tenant,
                                 artifacts)


def _checkpoint_adapter(checkpoint_id: str, session, tenant, artifacts):
    from api.adapters import adapter_response

    scoped = Scoped(session, tenant)
    ckpt = scoped.get(Checkpoint, checkpoint_id, "checkpoint")
    return adapter_response(artifacts, scoped.get(Job, ckpt.job_id, "fine-tuning job"), ckpt)


