"""API fixtures: each test gets a fresh database, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import json
import secrets

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from store.db import migrate, session_factory, session_scope
from store.keys import create_key, create_tenant
from store.settings import Settings

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path):
    if request.param == "sqlite":
        yield Settings(data_dir=tmp_path / "data", secret_key="test-secret")
        return
    name = f"driftsafe_t_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    settings = Settings(data_dir=tmp_path / "data", database_url=url, secret_key="test-secret")
    yield settings
    session_factory(settings).kw["bind"].dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def client(settings):
    migrate(settings)
    with TestClient(create_app(settings)) as c:
        yield c


def make_tenant(settings: Settings, name: str) -> dict:
    with session_scope(settings) as s:
        tenant = create_tenant(s, name)
        row, key = create_key(s, settings.hmac_key(), tenant)
    return {"Authorization": f"Bearer {key}", "_key_id": row.id}


@pytest.fixture
def alice(client, settings):
    return make_tenant(settings, "alice")


@pytest.fixture
def bob(client, settings):
    return make_tenant(settings, "bob")


def h(tenant: dict, **extra) -> dict:
    return {k: v for k, v in tenant.items() if not k.startswith("_")} | extra


QA_LINES = [{"question": f"Where was Person {i} born ?", "answer": f"City{i}"} for i in range(6)]


def jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload(client, tenant, data: bytes = None, name="train.jsonl", **headers):
    return client.post("/v1/files", headers=h(tenant, **headers),
                       files={"file": (name, data if data is not None else jsonl(QA_LINES))},
                       data={"purpose": "fine-tune"})
