"""Malformed and hostile requests, table-driven: each must be answered 4xx (never 5xx) in the
error envelope, and leave the database and the artifact store exactly as they were.

One app and one database per backend serve every case (a module-scoped world: two tenants with
files, jobs, a checkpoint and a webhook), so the table stays cheap to grow. Case ids say what each
case sends. A case that shows a 5xx in a route this file's author does not own is kept, marked
xfail(strict=True) with the reason, so that it turns into a failure the day it is fixed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from store.db import migrate, session_factory, session_scope
from store.keys import revoke_key
from store.models import Base, Checkpoint, Job
from store.settings import Settings
from tests.api.conftest import PG_ADMIN, QA_LINES, h, jsonl, make_tenant, upload

BACKENDS = ("sqlite", "postgresql")
MAX_JSON = 16 * 1024
MAX_UPLOAD = 100_000
MAX_STORAGE = 8 * 1024


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """One app per backend with the limits above and rate limiting off (the table is one burst)."""
    backend, tmp = request.param, tmp_path_factory.mktemp("hostile")
    limits = {"rate_limit_per_minute": 0, "max_json_body_bytes": MAX_JSON,
              "max_upload_bytes": MAX_UPLOAD, "max_storage_bytes": MAX_STORAGE}
    name = None
    if backend == "sqlite":
        settings = Settings(data_dir=tmp / "data", secret_key="test-secret", **limits)
    else:
        name = f"driftsafe_t_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        settings = Settings(data_dir=tmp / "data", secret_key="test-secret", **limits,
                            database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    migrate(settings)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield _populate(client, settings)
    finally:
        if name:
            session_factory(settings).kw["bind"].dispose()
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _populate(client, settings) -> dict:
    alice, bob = make_tenant(settings, "alice"), make_tenant(settings, "bob")
    mallory = make_tenant(settings, "mallory")
    with session_scope(settings) as s:
        revoke_key(s, mallory["_key_id"])
    ids = {}
    ids["alice_file"] = upload(client, alice, **{"Idempotency-Key": "setup-upload"}).json()["id"]
    job = {"model": "driftsafe-factlm-tiny", "training_file": ids["alice_file"]}
    ids["alice_job"] = client.post("/v1/fine_tuning/jobs", json=job, headers=h(
        alice, **{"Idempotency-Key": "setup-job"})).json()["id"]
    ids["alice_cancelled"] = client.post("/v1/fine_tuning/jobs", json=job,
                                         headers=h(alice)).json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{ids['alice_cancelled']}/cancel", headers=h(alice))
    ids["bob_file"] = upload(client, bob).json()["id"]
    ids["bob_job"] = client.post("/v1/fine_tuning/jobs", headers=h(bob), json={
        "model": "driftsafe-factlm-tiny", "training_file": ids["bob_file"]}).json()["id"]
    # A public address literal: accepted without DNS (this machine may have none), never called.
    hook = client.post("/v1/webhooks", headers=h(bob), json={"url": "https://93.184.215.14/hook"})
    assert hook.status_code == 200, hook.text
    ids["bob_webhook"] = hook.json()["id"]
    with session_scope(settings) as s:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == ids["bob_job"]))
        rel = f"{tenant_id}/jobs/{ids['bob_job']}/checkpoints/step-000002"
        ckpt = Checkpoint(tenant_id=tenant_id, job_id=ids["bob_job"], step_number=2,
                          storage_path=rel, metrics={}, drift_safe=True)
        s.add(ckpt)
        s.flush()
        ids["bob_ckpt"] = ckpt.id
    adapter = settings.artifacts_dir / rel / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return {"client": client, "settings": settings, "ids": ids,
            "keys": {"alice": alice, "bob": bob, "mallory": mallory}}


def database_rows(settings) -> dict[str, list]:
    with session_scope(settings) as s:
        return {t.name: sorted(map(repr, s.execute(select(t)).all()))
                for t in Base.metadata.sorted_tables}


def stored_files(settings) -> dict[str, tuple[int, int]]:
    root = settings.artifacts_dir
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


# --- The table -----------------------------------------------------------------------------------

ALICE = object()  # default: alice's key


@dataclass
class Case:
    id: str
    method: str
    path: str
    status: int | tuple[int, ...] | None = None  # None: any 4xx; else exactly these
    json: Any = None                        # a value, or a function of the world's ids
    content: bytes | Callable | None = None
    files: dict | None = None
    data: dict | None = None
    params: dict | None = None
    headers: dict = field(default_factory=dict)
    auth: Any = ALICE                       # ALICE, a tenant name, None, or a raw header value
    xfail: dict[str, str] = field(default_factory=dict)  # backend -> reason


def nest(depth: int) -> str:
    return "[" * depth + "]" * depth


JOB = {"model": "driftsafe-factlm-tiny", "training_file": "{alice_file}"}
JSON_HEAD = {"Content-Type": "application/json"}


def job(**changes) -> dict:
    return {**JOB, **changes}


def hp(**values) -> dict:
    return job(method={"type": "supervised", "supervised": {"hyperparameters": values}})


def up(data: bytes, name: str = "train.jsonl", purpose: str = "fine-tune", **kw) -> dict:
    return {"files": {"file": (name, data)}, "data": {"purpose": purpose}, **kw}


CASES = [
    # -- JSON bodies that are not what the route takes
    Case("body-not-json", "POST", "/v1/fine_tuning/jobs", content=b"{not json", headers=JSON_HEAD),
    Case("body-empty", "POST", "/v1/fine_tuning/jobs", content=b"", headers=JSON_HEAD),
    Case("body-array", "POST", "/v1/fine_tuning/jobs", json=[JOB]),
    Case("body-string", "POST", "/v1/fine_tuning/jobs", json="model"),
    Case("body-null", "POST", "/v1/fine_tuning/jobs", content=b"null", headers=JSON_HEAD),
    Case("body-trailing-garbage", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=b'{"model": "driftsafe-factlm-tiny"} trailing'),
    Case("body-text-plain", "POST", "/v1/fine_tuning/jobs", content=json.dumps(JOB).encode(),
         headers={"Content-Type": "text/plain"}),
    Case("body-form-urlencoded", "POST", "/v1/fine_tuning/jobs", content=b"model=x&training_file=y",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("body-utf16", "POST", "/v1/fine_tuning/jobs", content=json.dumps(
        {"model": "nope", "training_file": "f"}).encode("utf-16"), headers=JSON_HEAD),
    Case("body-invalid-utf8", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=b'{"model": "driftsafe-\xff\xfe", "training_file": "f"}'),
    Case("body-unknown-field", "POST", "/v1/fine_tuning/jobs", json=job(surprise=True)),
    Case("body-missing-model", "POST", "/v1/fine_tuning/jobs", json={"training_file": "f"}),
    Case("body-model-int", "POST", "/v1/fine_tuning/jobs", json=job(model=5)),
    Case("body-model-empty", "POST", "/v1/fine_tuning/jobs", json=job(model="")),
    Case("body-model-unknown", "POST", "/v1/fine_tuning/jobs", json=job(model="gpt-99")),
    Case("body-model-nul", "POST", "/v1/fine_tuning/jobs", json=job(model="driftsafe\x00tiny")),
    Case("body-training-file-object", "POST", "/v1/fine_tuning/jobs", json=job(training_file={})),
    Case("body-training-file-10k-chars", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="file-" + "a" * 10_000)),
    Case("body-training-file-missing", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="file-nope")),
    Case("body-training-file-nul", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="file-\x00")),
    Case("body-training-file-lone-surrogate", "POST", "/v1/fine_tuning/jobs",
         content=b'{"model": "driftsafe-factlm-tiny", "training_file": "file-\\ud800"}',
         headers=JSON_HEAD),
    Case("body-training-file-sql", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="' OR '1'='1")),
    Case("body-method-unknown-type", "POST", "/v1/fine_tuning/jobs",
         json=job(method={"type": "rlhf"})),
    Case("body-method-block-mismatch", "POST", "/v1/fine_tuning/jobs", json=job(method={
        "type": "supervised", "self_distillation": {"hyperparameters": {}}})),
    Case("body-hyperparameters-twice", "POST", "/v1/fine_tuning/jobs",
         json={**hp(n_epochs=1), "hyperparameters": {"n_epochs": 2}}),
    Case("body-n-epochs-negative", "POST", "/v1/fine_tuning/jobs", json=hp(n_epochs=-1)),
    Case("body-n-epochs-huge", "POST", "/v1/fine_tuning/jobs", json=hp(n_epochs=10**30)),
    Case("body-n-epochs-5000-digits", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=b'{"model": "driftsafe-factlm-tiny", "training_file": "f", "seed": 1'
                 + b"0" * 5000 + b"}"),
    Case("body-batch-size-fraction", "POST", "/v1/fine_tuning/jobs", json=hp(batch_size=1.5)),
    Case("body-batch-size-string", "POST", "/v1/fine_tuning/jobs", json=hp(batch_size="32; drop")),
    Case("body-learning-rate-nan", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD, content=(
        b'{"model": "driftsafe-factlm-tiny", "training_file": "{alice_file}", "method": {"type": '
        b'"supervised", "supervised": {"hyperparameters": {"learning_rate": NaN}}}}')),
    Case("body-learning-rate-infinity", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD, content=(
        b'{"model": "driftsafe-factlm-tiny", "training_file": "{alice_file}", "method": {"type": '
        b'"supervised", "supervised": {"hyperparameters": {"learning_rate": Infinity}}}}')),
    Case("body-learning-rate-1e999", "POST", "/v1/fine_tuning/jobs", json=None, headers=JSON_HEAD,
         content=(b'{"model": "driftsafe-factlm-tiny", "training_file": "{alice_file}", "method": '
                  b'{"type": "supervised", "supervised": {"hyperparameters": '
                  b'{"learning_rate": 1e999}}}}')),
    Case("body-seed-negative", "POST", "/v1/fine_tuning/jobs", json=job(seed=-1)),
    Case("body-seed-2-pow-63", "POST", "/v1/fine_tuning/jobs", json=job(seed=2**63)),
    Case("body-adapter-r-zero", "POST", "/v1/fine_tuning/jobs",
         json=job(adapter={"type": "lora", "r": 0})),
    Case("body-adapter-unknown", "POST", "/v1/fine_tuning/jobs",
         json=job(adapter={"type": "qlora"})),
    Case("body-max-forgetting-2", "POST", "/v1/fine_tuning/jobs",
         json=job(evaluation={"max_forgetting": 2})),
    Case("body-known-facts-of-bob", "POST", "/v1/fine_tuning/jobs",
         json=job(evaluation={"known_facts_file": "{bob_file}"})),
    Case("body-training-file-of-bob", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="{bob_file}")),
    Case("body-validation-file-of-bob", "POST", "/v1/fine_tuning/jobs",
         json=job(validation_file="{bob_file}")),
    Case("body-metadata-17-keys", "POST", "/v1/fine_tuning/jobs",
         json=job(metadata={f"k{i}": "v" for i in range(17)})),
    Case("body-metadata-long-value", "POST", "/v1/fine_tuning/jobs",
         json=job(metadata={"k": "v" * 513})),
    Case("body-metadata-nested", "POST", "/v1/fine_tuning/jobs",
         json=job(metadata={"k": {"a": 1}})),
    Case("body-metadata-nul", "POST", "/v1/fine_tuning/jobs",
         json=job(training_file="file-nope", metadata={"k\x00": "v\x00"})),
    Case("body-suffix-path", "POST", "/v1/fine_tuning/jobs", json=job(suffix="../../etc")),
    Case("body-suffix-unicode", "POST", "/v1/fine_tuning/jobs", json=job(suffix="b\u00f6t\u202e")),
    Case("body-suffix-65-chars", "POST", "/v1/fine_tuning/jobs", json=job(suffix="s" * 65)),
    # -- nesting
    Case("nesting-100000-in-integrations", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=('{"model": "driftsafe-factlm-tiny", "training_file": "f", "integrations": '
                  f'[{{"x": {nest(100_000)}}}]}}').encode(), status=(400, 413)),
    Case("nesting-900-in-integrations", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=('{"model": "driftsafe-factlm-tiny", "training_file": "file-nope", '
                  f'"integrations": [{{"x": {nest(900)}}}]}}').encode()),
    Case("nesting-5000-as-model", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=f'{{"model": {nest(5000)}}}'.encode()),
    Case("nesting-5000-in-webhook-events", "POST", "/v1/webhooks", headers=JSON_HEAD,
         content=f'{{"url": "https://example.com/h", "events": {nest(5000)}}}'.encode()),
    Case("nesting-objects-5000", "POST", "/v1/fine_tuning/jobs", headers=JSON_HEAD,
         content=('{"a": ' * 5000 + "1" + "}" * 5000).encode()),
    # -- sizes
    Case("body-over-max-json-by-length", "POST", "/v1/fine_tuning/jobs", status=413,
         json=job(metadata={"k": "v" * MAX_JSON})),
    Case("body-over-max-json-chunked", "POST", "/v1/fine_tuning/jobs", status=413,
         headers=JSON_HEAD, content=lambda ids: iter(
             [json.dumps(job(metadata={"k": "v" * MAX_JSON})).encode()])),
    Case("webhook-body-over-max-json", "POST", "/v1/webhooks", status=413,
         json={"url": "https://example.com/" + "a" * MAX_JSON}),
    Case("upload-over-max-upload", "POST", "/v1/files", status=413,
         **up(b'{"question": "q", "answer": "' + b"a" * MAX_UPLOAD + b'"}\n')),
    Case("upload-over-storage-quota", "POST", "/v1/files", status=429,
         **up(jsonl(QA_LINES * 30))),
    # -- files
    Case("upload-no-file-field", "POST", "/v1/files", data={"purpose": "fine-tune"},
         files={"other": ("x.jsonl", jsonl(QA_LINES))}),
    Case("upload-no-purpose", "POST", "/v1/files", files={"file": ("t.jsonl", jsonl(QA_LINES))}),
    Case("upload-purpose-unknown", "POST", "/v1/files",
         **up(jsonl(QA_LINES), purpose="assistants")),
    Case("upload-purpose-nul", "POST", "/v1/files", **up(jsonl(QA_LINES), purpose="fine-tune\x00")),
    Case("upload-as-json-body", "POST", "/v1/files", json={"file": "x", "purpose": "fine-tune"}),
    # Each extra part was parsed and held (up to 1 MB each in memory) before the route ran.
    Case("upload-three-file-parts", "POST", "/v1/files", data={"purpose": "fine-tune"},
         files=[("file", ("a.jsonl", jsonl(QA_LINES))), ("file", ("b.jsonl", jsonl(QA_LINES))),
                ("other", ("c.jsonl", jsonl(QA_LINES)))]),
    Case("upload-200-fields", "POST", "/v1/files",
         data={"purpose": "fine-tune", **{f"f{i}": "x" for i in range(200)}},
         files={"file": ("t.jsonl", jsonl(QA_LINES))}),
    # Fields the route does not take were dropped silently (the document now says none may come).
    Case("upload-unknown-field", "POST", "/v1/files",
         data={"purpose": "fine-tune", "expires_after[anchor]": "created_at"},
         files={"file": ("t.jsonl", jsonl(QA_LINES))}),
    Case("upload-purpose-twice", "POST", "/v1/files",
         data={"purpose": ["fine-tune", "fine-tune"]},
         files={"file": ("t.jsonl", jsonl(QA_LINES))}),
    Case("upload-field-4k", "POST", "/v1/files",
         data={"purpose": "fine-tune", "expires_after[anchor]": "p" * 4096},
         files={"file": ("t.jsonl", jsonl(QA_LINES))}),
    Case("upload-broken-multipart", "POST", "/v1/files", content=b"--zz\r\nnot a part",
         headers={"Content-Type": "multipart/form-data; boundary=zz"}),
    Case("upload-multipart-no-boundary", "POST", "/v1/files", content=b"whatever",
         headers={"Content-Type": "multipart/form-data"}),
    Case("upload-empty-file", "POST", "/v1/files", **up(b"")),
    Case("upload-blank-lines-only", "POST", "/v1/files", **up(b"\n\r\n   \n")),
    Case("upload-png", "POST", "/v1/files", **up(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))),
    Case("upload-json-array-line", "POST", "/v1/files", **up(b'[{"question": "q"}]\n')),
    Case("upload-nested-line", "POST", "/v1/files", **up(jsonl(QA_LINES) + b"[" * 50_000)),
    Case("upload-nested-object-line", "POST", "/v1/files",
         **up(b'{"question": "q", "answer": "a", "metadata": ' + b'{"a": ' * 5000 + b"1"
              + b"}" * 5001 + b"\n")),
    Case("upload-latin1", "POST", "/v1/files", **up(b'{"question": "caf\xe9", "answer": "a"}\n')),
    Case("upload-utf16", "POST", "/v1/files", **up(jsonl(QA_LINES).decode().encode("utf-16"))),
    Case("upload-lone-surrogate-escape", "POST", "/v1/files",
         **up(b'{"question": "q\\ud800", "answer": "a"}\n')),
    Case("upload-nul-bytes", "POST", "/v1/files", **up(b'{"question": "q\x00", "answer": "a"}\n')),
    Case("upload-huge-int-id", "POST", "/v1/files",
         **up(b'{"question": "q", "answer": "a", "id": 1' + b"0" * 5000 + b"}\n")),
    Case("upload-chat-wrong-role", "POST", "/v1/files", **up(jsonl([{"messages": [
        {"role": "root", "content": "q"}, {"role": "assistant", "content": "a"}]}]))),
    Case("upload-idempotency-key-other-file", "POST", "/v1/files", status=422,
         headers={"Idempotency-Key": "setup-upload"}, **up(jsonl(QA_LINES[:2]))),
    # -- headers
    Case("auth-missing", "GET", "/v1/files", status=401, auth=None),
    Case("auth-basic", "GET", "/v1/files", status=401, auth="Basic YWxpY2U6cHc="),
    Case("auth-bearer-empty", "GET", "/v1/files", status=401, auth="Bearer "),
    Case("auth-bearer-10k-chars", "GET", "/v1/files", status=401, auth="Bearer " + "k" * 10_000),
    Case("auth-bearer-latin1-bytes", "GET", "/v1/files", status=401, auth=b"Bearer \xff\xfe"),
    Case("auth-revoked-key", "GET", "/v1/files", status=401, auth="mallory"),
    Case("auth-revoked-key-upload", "POST", "/v1/files", status=401, auth="mallory",
         **up(jsonl(QA_LINES))),
    Case("idempotency-key-too-long", "POST", "/v1/fine_tuning/jobs", json=JOB,
         headers={"Idempotency-Key": "k" * 300}),
    Case("idempotency-key-empty", "POST", "/v1/fine_tuning/jobs", json=JOB,
         headers={"Idempotency-Key": ""}),
    Case("idempotency-key-control-chars", "POST", "/v1/fine_tuning/jobs", json=JOB,
         headers={"Idempotency-Key": "a\tb"}),
    Case("idempotency-key-reused-other-body", "POST", "/v1/fine_tuning/jobs", status=422,
         json=job(suffix="other"), headers={"Idempotency-Key": "setup-job"}),
    # -- ids: other tenants', malformed, wrong kind
    Case("bob-file-get", "GET", "/v1/files/{bob_file}", status=404),
    Case("bob-file-content", "GET", "/v1/files/{bob_file}/content", status=404),
    Case("bob-file-delete", "DELETE", "/v1/files/{bob_file}", status=404),
    Case("bob-job-get", "GET", "/v1/fine_tuning/jobs/{bob_job}", status=404),
    Case("bob-job-cancel", "POST", "/v1/fine_tuning/jobs/{bob_job}/cancel", status=404),
    Case("bob-job-events", "GET", "/v1/fine_tuning/jobs/{bob_job}/events", status=404),
    Case("bob-job-checkpoints", "GET", "/v1/fine_tuning/jobs/{bob_job}/checkpoints", status=404),
    Case("bob-job-adapter", "GET", "/v1/fine_tuning/jobs/{bob_job}/adapter", status=404),
    Case("bob-checkpoint-adapter", "GET", "/v1/fine_tuning/checkpoints/{bob_ckpt}/adapter",
         status=404),
    Case("bob-webhook-delete", "DELETE", "/v1/webhooks/{bob_webhook}", status=404),
    Case("id-file-nul", "GET", "/v1/files/file-%00", status=(400, 404)),
    Case("id-file-nul-delete", "DELETE", "/v1/files/file-%00x", status=(400, 404)),
    Case("id-job-nul", "GET", "/v1/fine_tuning/jobs/ftjob-%00", status=(400, 404)),
    Case("id-job-nul-cancel", "POST", "/v1/fine_tuning/jobs/%00/cancel", status=(400, 404)),
    Case("id-checkpoint-nul", "GET", "/v1/fine_tuning/checkpoints/%00/adapter", status=(400, 404)),
    Case("id-file-10k-chars", "GET", "/v1/files/file-" + "x" * 10_000, status=(400, 404)),
    Case("id-file-dotdot", "GET", "/v1/files/..%2F..%2Fetc%2Fpasswd/content", status=(400, 404)),
    Case("id-file-sql", "GET", "/v1/files/file-'%20OR%20'1'='1", status=(400, 404)),
    Case("id-file-unicode", "GET", "/v1/files/file-%C3%BC%E2%80%AE", status=(400, 404)),
    Case("id-file-invalid-utf8", "GET", "/v1/files/file-%FF%FE", status=(400, 404)),
    Case("id-job-is-a-file-id", "GET", "/v1/fine_tuning/jobs/{alice_file}", status=404),
    Case("id-model-dotdot", "GET", "/v1/models/..%2F..%2Fetc", status=(400, 404)),
    Case("id-webhook-nul", "DELETE", "/v1/webhooks/wh_%00", status=(400, 404)),
    # -- state
    Case("cancel-cancelled-job", "POST", "/v1/fine_tuning/jobs/{alice_cancelled}/cancel",
         status=409),
    Case("delete-file-of-queued-job", "DELETE", "/v1/files/{alice_file}", status=409),
    Case("adapter-before-any-checkpoint", "GET", "/v1/fine_tuning/jobs/{alice_job}/adapter",
         status=404),
    Case("adapter-select-bogus", "GET", "/v1/fine_tuning/jobs/{alice_job}/adapter",
         params={"select": "best"}),
    # -- pagination
    Case("page-limit-zero", "GET", "/v1/files", params={"limit": "0"}),
    Case("page-limit-101", "GET", "/v1/fine_tuning/jobs", params={"limit": "101"}),
    Case("page-limit-negative", "GET", "/v1/files", params={"limit": "-1"}),
    Case("page-limit-text", "GET", "/v1/files", params={"limit": "ten"}),
    Case("page-limit-float", "GET", "/v1/files", params={"limit": "1e3"}),
    Case("page-limit-30-digits", "GET", "/v1/fine_tuning/jobs", params={"limit": "9" * 30}),
    Case("page-limit-5000-digits", "GET", "/v1/files", params={"limit": "9" * 5000}),
    Case("page-after-missing", "GET", "/v1/files", params={"after": "file-nope"}),
    Case("page-after-bobs-file", "GET", "/v1/files", params={"after": "{bob_file}"}),
    Case("page-after-bobs-job", "GET", "/v1/fine_tuning/jobs", params={"after": "{bob_job}"}),
    Case("page-after-nul", "GET", "/v1/fine_tuning/jobs", params={"after": "ftjob-\x00"}),
    Case("page-after-10k-chars", "GET", "/v1/files", params={"after": "f" * 10_000}),
    Case("page-events-limit-zero", "GET", "/v1/fine_tuning/jobs/{alice_job}/events",
         params={"limit": "0"}),
    Case("page-checkpoints-limit-1000", "GET", "/v1/fine_tuning/jobs/{alice_job}/checkpoints",
         params={"limit": "1000"}),
    Case("page-webhooks-after-bobs", "GET", "/v1/webhooks", params={"after": "{bob_webhook}"}),
    Case("page-metadata-filter-after-missing", "GET", "/v1/fine_tuning/jobs",
         params={"metadata[team]": "x", "after": "ftjob-nope"}),
    Case("page-status-bogus", "GET", "/v1/fine_tuning/jobs", params={"status": "exploded"}),
    # What Schemathesis sends for a number or an object where the document wants an object or a
    # string: an unnamed metadata key and an empty cursor (both were answered 200 before).
    Case("page-metadata-filter-no-key", "GET", "/v1/fine_tuning/jobs",
         params={"metadata[]": "4.3e35"}),
    Case("page-after-empty", "GET", "/v1/fine_tuning/jobs", params={"after": ""}),
    # A job carries at most 16 pairs; about 1,000 filters made SQLite refuse the query ("Expression
    # tree is too large"), answered as a 503 database outage that clients retry forever.
    Case("page-metadata-filters-1100", "GET", "/v1/fine_tuning/jobs",
         params={f"metadata[k{i}]": "v" for i in range(1100)}),
    Case("page-metadata-filters-17", "GET", "/v1/fine_tuning/jobs",
         params={f"metadata[k{i}]": "v" for i in range(17)}),
    # -- webhooks
    Case("webhook-url-ftp", "POST", "/v1/webhooks", json={"url": "ftp://example.com/h"}),
    Case("webhook-url-javascript", "POST", "/v1/webhooks", json={"url": "javascript:alert(1)"}),
    Case("webhook-url-nul", "POST", "/v1/webhooks", json={"url": "https://example.com/\x00"}),
    Case("webhook-events-bogus", "POST", "/v1/webhooks",
         json={"url": "https://example.com/h", "events": ["fine_tuning.job.exploded"]}),
    Case("webhook-unknown-field", "POST", "/v1/webhooks",
         json={"url": "https://example.com/h", "secret": "mine"}),
    # -- routes and methods
    Case("route-unknown", "GET", "/v1/nope", status=404),
    Case("method-put-files", "PUT", "/v1/files", status=405, json={}),
    Case("method-post-models", "POST", "/v1/models", status=405, json={}),
    Case("method-delete-jobs", "DELETE", "/v1/fine_tuning/jobs/{alice_job}", status=405),
]

# 5xx that these cases found in routes owned elsewhere: backend -> reason, per case id.
KNOWN_5XX: dict[str, dict[str, str]] = {}


def _params():
    for backend in BACKENDS:
        for case in CASES:
            reason = {**case.xfail, **KNOWN_5XX.get(case.id, {})}.get(backend)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(backend, case, id=f"{backend}-{case.id}", marks=marks)


def _fill(value, ids):
    if isinstance(value, str):
        for k, v in ids.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, bytes):
        return _fill(value.decode("latin-1"), ids).encode("latin-1")
    if isinstance(value, dict):
        return {_fill(k, ids): _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


def send(world, case: Case):
    ids, keys = world["ids"], world["keys"]
    if case.auth is ALICE:
        headers = h(keys["alice"])
    elif case.auth in keys:
        headers = h(keys[case.auth])
    else:
        headers = {} if case.auth is None else {"Authorization": case.auth}
    headers |= case.headers
    kwargs = {}
    if case.json is not None:
        kwargs["json"] = _fill(case.json, ids)
    if case.content is not None:
        content = case.content
        kwargs["content"] = content(ids) if callable(content) else _fill(content, ids)
    if case.files is not None:
        kwargs["files"] = case.files
    if case.data is not None:
        kwargs["data"] = case.data
    if case.params is not None:
        kwargs["params"] = _fill(case.params, ids)
    return world["client"].request(case.method, _fill(case.path, ids), headers=headers, **kwargs)


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("world, case", list(_params()), indirect=["world"], scope="module")
def test_hostile_request_is_4xx_in_the_envelope_and_changes_nothing(world, case):
    settings = world["settings"]
    rows, files = database_rows(settings), stored_files(settings)
    r = send(world, case)
    expected = case.status if isinstance(case.status, tuple) else (case.status,)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    assert 400 <= r.status_code and (case.status is None or r.status_code in expected), \
        f"{r.status_code}: {r.text[:500]}"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    assert error["type"] != "api_error", error  # a client's mistake, not the server's fault
    assert database_rows(settings) == rows
    assert stored_files(settings) == files


@pytest.mark.parametrize("shape", [b'"' + b'\\"' * (1 << 19), b'"a' * (1 << 19),
                                   b'"' + b"\\" * (1 << 20)])
def test_the_nesting_check_is_linear_on_unclosed_strings(shape):
    """The nesting check runs on every JSON body before the key check. A body of many unclosed
    quotes made its string pattern rescan the rest of the body from each one: one 1 MB request
    froze the event loop for over half an hour. Run apart, so a regression fails on its timeout
    instead of hanging the suite."""
    import subprocess
    import sys

    program = ("import sys; from api.app import json_depth_exceeds; "
               "print(json_depth_exceeds(sys.stdin.buffer.read()))")
    done = subprocess.run([sys.executable, "-c", program], input=b"[" * 40 + shape,
                          capture_output=True, timeout=30, check=True)
    assert done.stdout.strip() == b"True"  # 40 open brackets, outside any string
