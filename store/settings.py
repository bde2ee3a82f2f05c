"""One Settings class for every process, read from DRIFTSAFE_* environment variables.

Defaults work on a laptop with no servers: SQLite and files under the data dir, and a broker that
is a folder on disk. Production points DATABASE_URL at PostgreSQL and BROKER_URL at Redis.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIFTSAFE_", extra="ignore")

    data_dir: Path = Field(Path.home() / ".local" / "share" / "driftsafe",
                           description="Root of the SQLite file, artifacts and the local broker.")
    database_url: str | None = Field(None,
                                     description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; default a folder in data_dir.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_training_examples: int = Field(1_000_000, ge=1)
    secret_key: str | None = Field(None, description="HMAC key for API-key hashes (webhook "
                                   "endpoints sign with secrets of their own); default a file "
                                   "in data_dir.")
    heartbeat_seconds: float = Field(10.0, gt=0)
    stale_after_seconds: float = Field(120.0, gt=0, description="Heartbeat age that marks a "
                                                               "running job's worker dead.")
    lost_message_after_seconds: float = Field(
        300.0, gt=0, description="A queued job whose wake-up message was sent this long ago and "
        "that a Redis broker no longer holds (a worker died taking it) is sent a new one.")
    models: dict[str, str] = Field(default_factory=dict, description="Extra base models a worker "
                                   "can load: JSON object of model id -> local directory.")
    worlds_dir: Path | None = Field(None, description="Cache of built fact worlds (read by "
                                    "trainer.builtin from DRIFTSAFE_WORLDS_DIR); default "
                                    "~/.cache/driftsafe/worlds.")

    # --- Limits. Each says what it bounds; errors that enforce one name it. ---
    max_json_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest JSON request "
                                     "body (every route but file upload).")
    rate_limit_per_minute: int = Field(600, ge=0, description="Requests per tenant per minute, "
                                       "per API process (0: no limit); over it: 429.")
    rate_limit_burst: int = Field(120, ge=1, description="Requests a tenant may send at once "
                                  "before the per-minute rate applies.")
    max_running_jobs: int = Field(10, ge=0, description="A tenant's queued plus running jobs "
                                  "(0: no limit); over it: 429.")
    max_storage_bytes: int = Field(2 * 1024**3, ge=1, description="A tenant's uploaded bytes.")
    max_job_steps: int = Field(100_000, ge=1, description="Optimizer steps one job may take "
                               "(epochs x ceil(examples / batch size)).")
    max_job_tokens: int = Field(2_000_000_000, ge=1, description="Tokens one job may train on "
                                "(epochs x tokens of the training file).")
    task_time_limit_base_seconds: float = Field(1800.0, gt=0, description="Fixed part of a task's "
                                                "time limit: loading, scoring, saving.")
    task_time_limit_per_step_seconds: float = Field(30.0, gt=0, description="Time limit per "
                                                    "optimizer step, added to the base.")
    keep_last_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per job besides "
                                       "every drift-safe one; older ones are deleted.")
    max_lost_without_progress: int = Field(3, ge=1, description="Worker losses in a row with no "
                                           "new checkpoint before a job fails (poison pill).")
    key_cache_seconds: float = Field(30.0, ge=0, description="How long a verified API key is "
                                     "trusted without a database lookup (revocation delay).")
    idempotency_ttl_seconds: float = Field(24 * 3600.0, gt=0)
    opentelemetry: bool = Field(False, description="FastAPI's native OpenTelemetry spans, "
                                "metrics and logs, to whatever providers are configured. Off, "
                                "its per-request check costs about 5% of a job creation.")
    relay_poll_seconds: float = Field(1.0, gt=0, description="How often each worker's relay "
                                      "sends the messages of new and re-queued jobs: the most a "
                                      "new job waits before a worker is woken.")
    request_threads: int = Field(6, ge=1, description="Threads that run requests' blocking "
                                 "work (queries, validation) in one API process. Few on "
                                 "purpose: they share one interpreter lock, and 40 of them "
                                 "(anyio's default) spread latency under load with no gain in "
                                 "throughput.")
    bulk_threads: int = Field(2, ge=1, description="Threads for work that may hold one for "
                              "seconds (validating and storing uploads, drawing report images, "
                              "building adapter zips), apart from request_threads, so that such "
                              "requests never hold every request thread.")
    # A pool smaller than the threads that hold connections (requests, uploads, a worker's
    # threads) opens and closes overflow connections under load, each a PostgreSQL backend forked
    # and torn down (5% of a py-spy profile of job creations at 32 connections).
    db_pool_size: int = Field(40, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    webhook_allow_private: bool = Field(False, description="Allow webhook URLs on loopback, "
                                        "private and link-local addresses (tests, closed nets).")
    max_webhook_endpoints: int = Field(16, ge=1, description="Webhook endpoints one tenant may "
                                       "register: each job ending is one delivery per endpoint.")
    webhook_deadline_seconds: float = Field(10.0, gt=0, description="Wall-clock limit of one "
                                            "webhook delivery, connect to status line.")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _stale_outlasts_beats(self) -> Settings:
        # A live worker beats every heartbeat_seconds; were its beats declared stale sooner, the
        # reaper would requeue every running job between two beats, and each would fail after
        # max_lost_without_progress such "losses".
        if self.stale_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                f"stale_after_seconds ({self.stale_after_seconds:g}) must be at least three "
                f"heartbeats (3 x heartbeat_seconds = {3 * self.heartbeat_seconds:g}): a worker "
                "that missed one beat is not dead")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'driftsafe.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def hmac_key(self) -> bytes:
        """The configured secret, or one made once and kept (0600) in the data dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Written whole under a name of its own (0600 from its creation), then linked into
            # place: several API processes start at once on a fresh data dir, the first link
            # wins and the others read its key. (One shared temporary name let a process read
            # an empty key, or crash on a file another had already renamed.)
            fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".secret_key.")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()
