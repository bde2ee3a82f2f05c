"""Engines, sessions and migrations. Services never commit; the request or task boundary does."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pydantic_core
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from store.settings import Settings, get_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (API) don't block the writer (worker)
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def json_bytes(value) -> bytes:
    """JSON as driftsafe writes it everywhere (columns, responses, pages): by pydantic-core,
    twice as fast as the json module on a job's spec and four times on a page of jobs; non-finite
    floats as null (PostgreSQL's json type and browsers' JSON.parse reject NaN); text that is not
    Unicode (a lone surrogate, which has no UTF-8 form) escaped, as the json module writes it."""
    try:
        return pydantic_core.to_json(value, inf_nan_mode="null")
    except pydantic_core.PydanticSerializationError:
        return json.dumps(value, separators=(",", ":")).encode()


# JSON columns, written and parsed by pydantic-core (a page of jobs parses four such columns per
# row, a creation writes three).
def _json_text(value) -> str:
    return json_bytes(value).decode()


def _json_value(text: str | bytes):
    try:
        return pydantic_core.from_json(text)
    except ValueError:  # a lone surrogate escape ("\\ud800"), which the json module accepts
        return json.loads(text)


def make_engine(url: str, pool_size: int = 40, max_overflow: int = 10) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               json_serializer=_json_text, json_deserializer=_json_value)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=10,
                           json_serializer=_json_text, json_deserializer=_json_value,
                           # a database host that drops packets fails a request in 10 s rather
                           # than holding one of the API's few request threads for minutes
                           connect_args={"connect_timeout": 10})
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


IDLE_BEFORE_PING_S = 1.0


def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
    """Pessimistic disconnect handling, paid only where it helps: a connection that sat idle (and
    may have died with a database restart) is pinged before it is handed out; one in constant use
    is not pinged on every checkout (pool_pre_ping would add a round trip to every request).
    A failed ping makes the pool replace the connection (DisconnectionError)."""
    now = time.monotonic()
    if now - record.info.get("last_checkout", now) > IDLE_BEFORE_PING_S:
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as e:  # noqa: BLE001 - any failure means: not this connection
            raise DisconnectionError(str(e)) from e
    record.info["last_checkout"] = now


@lru_cache
def engine_for(url: str, pool_size: int = 40, max_overflow: int = 10) -> Engine:
    engine = make_engine(url, pool_size, max_overflow)
    _engines_made.append(engine)
    return engine


def _forget_inherited_connections() -> None:
    """A forked child (Celery's pool) must not use its parent's pooled connections: two processes
    on one socket or SQLite handle corrupt each other's state. Drop them without closing."""
    for engine in _engines_made:
        engine.dispose(close=False)


_engines_made: list[Engine] = []
os.register_at_fork(after_in_child=_forget_inherited_connections)


def session_factory(settings: Settings | None = None, *, autocommit: bool = False
                    ) -> sessionmaker[Session]:
    """Sessions on the settings' database. `autocommit` sessions are for requests that only
    read: each statement stands alone, with no BEGIN before it and no ROLLBACK after."""
    settings = settings or get_settings()
    engine = engine_for(settings.sqlalchemy_url, settings.db_pool_size, settings.db_max_overflow)
    if autocommit:
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None):
    """A unit of work: commits on success, rolls back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MIGRATION_LOCK = 0x64726674  # pg_advisory_lock key: "drft"


def migrate(settings: Settings | None = None) -> None:
    """Bring the database to the newest schema (idempotent; run before any server starts), one
    process at a time: `driftsafe up &` and `tenants create` right after it both migrate a fresh
    database, and the second ran the first revision again ("table tenants already exists")."""
    from alembic import command

    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _one_migrator(settings):
        command.upgrade(alembic_config(settings.sqlalchemy_url), "head")


@contextmanager
def _one_migrator(settings: Settings):
    """A lock across processes: an advisory lock on PostgreSQL, a file lock beside SQLite's."""
    url = settings.sqlalchemy_url
    if url.startswith("postgresql"):
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
                try:
                    yield
                finally:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        finally:
            engine.dispose()
        return
    import fcntl

    with open(settings.data_dir / ".migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
