"""One Settings class for every process, read from DRIFTSAFE_* environment variables.

Defaults work on a laptop with no servers: SQLite and files under the data dir, and a broker that
is a folder on disk. Production points DATABASE_URL at PostgreSQL and BROKER_URL at Redis.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIFTSAFE_", extra="ignore")

    data_dir: Path = Field(Path.home() / ".local" / "share" / "driftsafe",
                           description="Root of the SQLite file, artifacts and the local broker.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; default a folder in data_dir.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_training_examples: int = Field(1_000_000, ge=1)
    secret_key: str | None = Field(None, description="HMAC key for API-key hashes and webhook "
                                                      "signatures; default a file in data_dir.")
    heartbeat_seconds: float = Field(10.0, gt=0)
    stale_after_seconds: float = Field(120.0, gt=0, description="Heartbeat age that marks a "
                                                               "running job's worker dead.")
    requeue_after_seconds: float = Field(300.0, gt=0, description="Age of a queued job whose "
                                                                  "message is presumed lost.")
    models: dict[str, str] = Field(default_factory=dict, description="Extra base models a worker "
                                   "can load: JSON object of model id -> local directory.")
    worlds_dir: Path | None = Field(None, description="Cache of built fact worlds (read by "
                                    "trainer.builtin from DRIFTSAFE_WORLDS_DIR); default "
                                    "~/.cache/driftsafe/worlds.")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

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
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32))
            tmp.chmod(0o600)
            try:
                tmp.rename(path) if not path.exists() else tmp.unlink()
            except FileNotFoundError:
                pass
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()
