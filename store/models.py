"""Tables. Every tenant-owned row carries `tenant_id`; public ids are random strings, while an
integer `seq` gives a stable newest-first order for cursor pagination."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Plain JSON: native on PostgreSQL, TEXT on SQLite; no query here looks inside it.
JSONType = JSON
SeqType = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("org-"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)  # HMAC-SHA256, hex
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class StoredFile(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("file-"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))  # the client's name: a label, never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    lines: Mapped[int] = mapped_column(Integer, default=0)
    qa_only: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(32), default="processed")
    storage_path: Mapped[str] = mapped_column(Text)  # relative to the artifact root, server-made
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftjob-"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    known_facts_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict] = mapped_column(JSONType)  # TrainSpec as requested (autos unresolved)
    hyperparameters: Mapped[dict | None] = mapped_column(JSONType, nullable=True)  # resolved
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_metadata: Mapped[dict | None] = mapped_column("metadata", JSONType, nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)  # a store.jobstate.JobStatus
    error: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list] = mapped_column(JSONType, default=list)
    evaluation: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Poison-pill guard: worker losses in a row during which the job saved no new checkpoint.
    lost_without_progress: Mapped[int] = mapped_column(Integer, default=0)
    claimed_step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last ckpt at claim
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)  # known at creation
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftevent-"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")
    data: Mapped[dict | None] = mapped_column(JSONType, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftckpt_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSONType, default=dict)
    drift_safe: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    storage_path: Mapped[str] = mapped_column(Text)  # relative to the artifact root
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"
    id: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of route + canonical body
    state: Mapped[str] = mapped_column(String(16), default="in_flight")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("wh_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list] = mapped_column(JSONType, default=list)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


# No index leads with only tenant_id or job_id where one of these begins with it: each is
# another entry every insert writes, and these serve every lookup it would (migration 0005).
Index("ix_jobs_tenant_seq", Job.tenant_id, Job.seq)
Index("ix_jobs_tenant_status", Job.tenant_id, Job.status)  # the running-jobs quota
Index("ix_files_tenant_seq", StoredFile.tenant_id, StoredFile.seq)
Index("ix_job_events_job_seq", JobEvent.job_id, JobEvent.seq)  # a job's events, newest first
Index("ix_checkpoints_job_seq", Checkpoint.job_id, Checkpoint.seq)
Index("ix_idempotency_created", IdempotencyRecord.created_at)  # purging expired records


class WebhookDelivery(Base):
    """A signed event to POST to an endpoint, retried with backoff until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSONType)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    gave_up: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Only undelivered rows are ever scanned by the sender: a partial index keeps that scan small.
    __table_args__ = (Index("ix_webhook_deliveries_due", "next_attempt_at",
                            postgresql_where=text("delivered_at IS NULL AND NOT gave_up"),
                            sqlite_where=text("delivered_at IS NULL AND NOT gave_up")),)


def by_public_id(session, model, object_id: str):
    """Rows with a `seq` primary key are found by their public id, never by `session.get`."""
    from sqlalchemy import select

    return session.scalar(select(model).where(model.id == object_id))


# store.jobstate declares the jobs' index of unsent messages beside the statuses it names; it
# needs the models above, so it is imported last (and every user of the models gets the index).
from store import jobstate  # noqa: E402, F401
