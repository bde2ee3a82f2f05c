"""A job's report: its curves as a page (GET .../report) and as an image (GET .../report.png).

Both are built from the objects the JSON routes serve (job_object, event_object,
checkpoint_object over the same rows), read through the tenant scope like every other route:
401 without a key, 404 for another tenant's job.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Select, func, or_, select
from sqlalchemy.exc import OperationalError

from api.bulk import on_bulk_threads
from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas import ObjectId, checkpoint_object, event_object, job_object
from api.tenancy import Scoped
from api.ui import PAGE_HEADERS, report_page
from store.models import Checkpoint, Job, JobEvent

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])

HTML_OK = {200: {"description": "The report page: its charts draw from the job, its metrics "
                                "events and its checkpoints, and refresh while the job runs "
                                "(in a browser holding the key: the dashboard at /ui).",
                 "content": {"text/html": {"schema": {"type": "string"}}}}}
PNG_OK = {200: {"description": "The report as a PNG image (1200x800): scores and the "
                               "forgetting budget over steps with the drift-safe checkpoint "
                               "marked, losses, and the SliCK categories of the training set.",
                "content": {"image/png": {"schema": {"type": "string",
                                                     "contentMediaType": "image/png"}}}}}


# A worker writes a loss sample every 2 s, so a job of a few days has tens of thousands; a report
# draws at most this many of them, evenly spaced, the newest always among them. Scoring events
# (one per checkpoint, the ones with a known accuracy) are all kept.
MAX_LOSS_SAMPLES = 1000


def report_objects(session, tenant, job_id: str) -> tuple[dict, list[dict], list[dict]]:
    """The job, its metrics events (newest first, as /events pages them; loss samples thinned to
    MAX_LOSS_SAMPLES) and its checkpoints."""
    scoped = Scoped(session, tenant)
    job = scoped.get(Job, job_id, "fine-tuning job")
    metrics = scoped.select(JobEvent).where(JobEvent.job_id == job.id,
                                            JobEvent.type == "metrics")
    try:
        events = session.scalars(_thinned(session, metrics).order_by(JobEvent.seq.desc())).all()
    except OperationalError:
        # SQLite cannot read JSON holding a bare NaN, which rows written before JSON columns
        # went through pydantic-core (null for non-finite floats) may: such a job's report shows
        # every sample, as it did then.
        session.rollback()
        events = session.scalars(metrics.order_by(JobEvent.seq.desc())).all()
    checkpoints = session.scalars(scoped.select(Checkpoint).where(
        Checkpoint.job_id == job.id).order_by(Checkpoint.seq.desc()))
    return (job_object(job), [event_object(e) for e in events],
            [checkpoint_object(c, job) for c in checkpoints])


def _thinned(session, metrics: Select) -> Select:
    """`metrics` with its loss samples (every metrics event but the scoring ones, whatever its
    loss holds) cut to MAX_LOSS_SAMPLES: row n of L, newest first, is kept when
    (n-1)*MAX mod L < MAX, which keeps exactly MAX rows, L/MAX apart to within one, the newest
    among them."""
    is_score = JobEvent.data["known_accuracy"].as_float().is_not(None)
    samples = metrics.where(~is_score)
    count = session.scalar(select(func.count()).select_from(samples.subquery()))
    if count <= MAX_LOSS_SAMPLES:
        return metrics
    numbered = samples.with_only_columns(
        JobEvent.seq, func.row_number().over(order_by=JobEvent.seq.desc()).label("n"),
    ).subquery()
    kept = select(numbered.c.seq).where(
        (numbered.c.n - 1) * MAX_LOSS_SAMPLES % count < MAX_LOSS_SAMPLES)
    return metrics.where(or_(is_score, JobEvent.seq.in_(kept)))


@router.get("/jobs/{job_id}/report", response_class=HTMLResponse, responses=HTML_OK,
            summary="A job's report (HTML)")
def job_report(job_id: ObjectId, request: Request, session: SessionDep, tenant: CurrentTenant):
    return HTMLResponse(report_page(request, *report_objects(session, tenant, job_id)),
                        headers=PAGE_HEADERS)


@router.get("/jobs/{job_id}/report.png", response_class=Response, responses=PNG_OK,
            summary="A job's report (PNG)")
async def job_report_png(job_id: ObjectId, session: SessionDep, tenant: CurrentTenant,
                         settings: SettingsDep):
    # Drawing takes a good part of a second: on the bulk threads, not the request threads.
    return await on_bulk_threads(settings, _report_png, session, tenant, job_id)


def _report_png(session, tenant, job_id: str) -> Response:
    from api.charts import report_png  # matplotlib loads on the first image, not at start

    objects = report_objects(session, tenant, job_id)
    session.close()  # drawing takes a while: give the connection back first
    return Response(report_png(*objects), media_type="image/png",
                    headers={"Cache-Control": "no-store"})
