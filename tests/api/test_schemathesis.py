"""Schemathesis against a real uvicorn: property-based tests generated from /openapi.json, with
every check it has, as an authenticated tenant, on a fresh PostgreSQL database (the production
shape, and the database that refuses what SQLite lets through: a NUL in a string was a 500 there).

The document must be exactly as strict as validation, so a request it calls valid must not get a
400 and one it calls invalid must not get a 2xx. What no schema can say is supplied by
`_make_semantically_valid` below, for valid (positive) requests only: that a referenced file
exists, that an uploaded file holds training lines, that a webhook host resolves to a public
address, that a cursor names an existing object, that a layer range's ends are in order, and that
an Idempotency-Key is fresh (a reused one answers 422 by design). Schemathesis checks the edited
request against the schema again before sending it; invalid (negative) requests go as generated.

No worker runs: a created job only waits in the queue (max_running_jobs is lifted for this).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import uuid
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import schemathesis

from store.settings import Settings
from tests.live import new_tenant_key, running_api

pytestmark = pytest.mark.slow

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
MAX_EXAMPLES = 100  # per operation and phase: the whole run takes about a minute on 2 cores
# A gate replays the same requests every run, so a red CI means the code changed, not the dice.
# To explore (as a new user's `st run` does, and as found the cases in test_hostile_input's
# "Schemathesis sends" rows), run with DRIFTSAFE_SCHEMATHESIS_SEED=random, or another number.
_SEED = os.environ.get("DRIFTSAFE_SCHEMATHESIS_SEED", "0")
SEED = None if _SEED == "random" else int(_SEED)
QA_FILE = "".join(json.dumps({"question": f"Where was Person {i} born ?", "answer": f"City{i}"})
                  + "\n" for i in range(4)).encode()
PUBLIC_HOST = "93.184.215.14"  # a global unicast address: accepted without DNS; never called


@dataclass
class Live:
    url: str
    key: str
    file_id: str
    job_id: str
    webhook_id: str
    event_id: str


LIVE: Live | None = None  # what the hook below supplies; set while the server runs


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    global LIVE
    tmp = tmp_path_factory.mktemp("schemathesis")
    name = f"driftsafe_st_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    settings = Settings(data_dir=tmp / "data", secret_key="test-secret",
                        database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                        rate_limit_per_minute=0, max_running_jobs=1_000_000)
    try:
        key = new_tenant_key(settings, "schemathesis")
        with running_api(settings, tmp / "api.log") as url:
            LIVE = _seed(url, key)
            yield LIVE
    finally:
        LIVE = None
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _seed(url: str, key: str) -> Live:
    """One of each object a valid request may need to name."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("qa.jsonl", QA_FILE)}).raise_for_status().json()["id"]
        job_id = http.post("/v1/fine_tuning/jobs", json={
            "model": "driftsafe-factlm-tiny", "training_file": file_id,
        }).raise_for_status().json()["id"]
        webhook_id = http.post("/v1/webhooks", json={"url": f"https://{PUBLIC_HOST}/hook"}
                               ).raise_for_status().json()["id"]
        event_id = http.get(f"/v1/fine_tuning/jobs/{job_id}/events").raise_for_status(
        ).json()["data"][0]["id"]
    return Live(url, key, file_id, job_id, webhook_id, event_id)


def test_api_behaves_as_its_openapi_document_says(live):
    # The engine `st run` drives, so this finds what a new user running Schemathesis would: every
    # phase (examples, coverage, fuzzing, stateful), every check. (schemathesis.pytest's lazy
    # loader, which reads the document from a live server, does not run under pytest 9.2.)
    config = schemathesis.Config.from_dict({
        "cache": {"enabled": False},  # no .schemathesis/ in the checkout
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        "checks": {"enabled": True},
        "auth": {"openapi": {"bearerAuth": {"bearer": live.key}}},
        "workers": 1,
        "request-timeout": 30,
        **({"seed": SEED} if SEED is not None else {}),
    })
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)
    failures, errors, tested = _run(schema)
    report = "\n\n".join(failures + errors)
    assert not failures and not errors, f"{len(failures)} failures, {len(errors)} errors:\n{report}"
    assert tested >= len(list(schema.get_all_operations())), "operations went untested"


def _run(schema) -> tuple[list[str], list[str], int]:
    """(distinct failures, errors, scenarios tested), as `st run` would report them."""
    from schemathesis.engine import Status, from_schema
    from schemathesis.engine.events import FatalError, NonFatalError, ScenarioFinished

    seen, failures, errors, tested = [], [], [], 0
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished):
            tested += event.status != Status.SKIP
            for checks in event.recorder.checks.values():
                for check in checks:
                    info = check.failure_info
                    if info is not None and info.failure not in seen:
                        seen.append(info.failure)
                        f = info.failure
                        failures.append(f"{f.operation}: {f.code} {f}\n{info.code_sample}")
        elif isinstance(event, NonFatalError):
            errors.append(f"{event.label}: {event.info.error!r}")
        elif isinstance(event, FatalError):
            raise event.exception
    return failures, errors, tested


@schemathesis.hook
def before_call(context, case, kwargs):
    if LIVE is not None and case.meta is not None and case.meta.generation.mode.is_positive:
        _make_semantically_valid(case, LIVE)


_CURSORS = {"/v1/files": "file_id", "/v1/fine_tuning/jobs": "job_id",
            "/v1/webhooks": "webhook_id", "/v1/fine_tuning/jobs/{job_id}/events": "event_id"}
_HOST = re.compile(r"^(https?://)[^/?#:]+")
_REVERSED = re.compile(r"^layers:([0-9]+)-([0-9]+)$")


def _make_semantically_valid(case, live: Live) -> None:
    path, method = case.operation.path, case.method.upper()
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            headers[name] = uuid.uuid4().hex
    if case.query and case.query.get("after") is not None:
        cursor = _CURSORS.get(path)
        if cursor is None:
            del case.query["after"]  # checkpoints: none exist to page after
        else:
            case.query["after"] = getattr(live, cursor)
    body = case.body if isinstance(case.body, dict) else None
    if body is None or method != "POST":
        return
    if path == "/v1/files" and "file" in body:
        body["file"] = QA_FILE.decode()  # text: Schemathesis judges a body holding bytes invalid
    elif path == "/v1/webhooks" and isinstance(body.get("url"), str):
        body["url"] = _HOST.sub(rf"\g<1>{PUBLIC_HOST}", body["url"])
    elif path == "/v1/fine_tuning/jobs":
        for key in ("training_file", "validation_file"):
            if isinstance(body.get(key), str):
                body[key] = live.file_id
        evaluation = body.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("known_facts_file"), str):
            evaluation["known_facts_file"] = live.file_id
        _order_layer_ranges(body.get("method"))


def _order_layer_ranges(method) -> None:
    """`layers:A-B` needs A <= B, which a pattern cannot say; give a reversed range in order."""
    try:
        trainable = method["frozen_groups"]["hyperparameters"]["trainable"]
    except (KeyError, TypeError):
        return
    if isinstance(trainable, list):
        for i, name in enumerate(trainable):
            m = _REVERSED.match(name) if isinstance(name, str) else None
            if m and int(m.group(2)) < int(m.group(1)):
                trainable[i] = f"layers:{m.group(2)}-{m.group(1)}"
