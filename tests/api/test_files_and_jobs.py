
import json

import pytest

from store.db import session_scope
from store.keys import revoke_key
from store.models import Job, StoredFile
from tests.api.conftest import QA_LINES, h, jsonl, upload


def count(settings, model):
    with session_scope(settings) as s:
        return s.query(model).count()


def test_upload_list_get_content_delete(client, alice):
    r = upload(client, alice)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["id"].startswith("file-") and f["lines"] == len(QA_LINES)
    assert client.get(f"/v1/files/{f['id']}", headers=h(alice)).json() == f
    assert client.get(f"/v1/files/{f['id']}/content", headers=h(alice)).content == jsonl(QA_LINES)
    listed = client.get("/v1/files", headers=h(alice)).json()
    assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == [f["id"]]
    d = client.delete(f"/v1/files/{f['id']}", headers=h(alice))
    assert d.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{f['id']}", headers=h(alice)).status_code == 404


def test_client_filename_is_only_a_label(client, alice, settings):
    r = upload(client, alice, name="../../etc/passwd")
    assert r.status_code == 200 and r.json()["filename"] == "passwd"
    with session_scope(settings) as s:
        stored = s.query(StoredFile).one()
        assert stored.storage_path.endswith(f"/files/{stored.id}.jsonl")
        assert "passwd" not in stored.storage_path


@pytest.mark.parametrize("data, line, reason", [
    (b'{"question": "q", "answer": "a"}\n{broken\n', 2, "not valid JSON"),
    (b'{"question": "q", "answer": "a"}\n\n{"question": "q"}\n', 3, "needs 'answer'"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "last message"),
    (b"", 0, "no examples"),
])
def test_bad_upload_is_400_with_line_and_leaves_nothing(client, alice, settings, data, line,
                                                        reason):
    r = upload(client, alice, data)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "file" and reason in err["message"]
    if line:
        assert f"line {line}:" in err["message"]
    assert count(settings, StoredFile) == 0
    files_dir = settings.artifacts_dir
    assert not files_dir.exists() or not any(p.is_file() for p in files_dir.rglob("*"))


def test_upload_over_the_limit_is_413(settings, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.db import migrate
    from tests.api.conftest import make_tenant

    small = settings.model_copy(update={"max_upload_bytes": 100})
    migrate(small)
    with TestClient(create_app(small)) as c:
        t = make_tenant(small, "carol")
        r = upload(c, t, b'{"question": "q", "answer": "' + b"a" * 200 + b'"}\n')
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        r = upload(c, t, b"x" * 200_000)
        assert r.status_code == 413
    assert count(small, StoredFile) == 0


def create_job(client, tenant, file_id, method=None, **extra):
    body = {"model": "driftsafe-factlm-tiny", "training_file": file_id, **extra}
    if method:
        body["method"] = method
    return client.post("/v1/fine_tuning/jobs", headers=h(tenant), json=body)


METHODS = [
    {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    {"type": "self_distillation", "self_distillation": {"hyperparameters": {
        "distill_weight": 2.0, "distill_temperature": 0.7, "teacher": "format_warmup"}}},
    {"type": "frozen_groups", "frozen_groups": {"hyperparameters": {"trainable": ["attention"]}}},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["type"])
def test_create_job_of_each_method_is_stored_and_a_relay_sends_it(client, alice, settings, method):
    fid = upload(client, alice).json()["id"]
    r = create_job(client, alice, fid, method, metadata={"team": "search"}, suffix="bot")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["method"]["type"] == method["type"]
    hp = job["method"][method["type"]]["hyperparameters"]
    for k, v in method[method["type"]]["hyperparameters"].items():
        assert hp[k] == v
    assert job["evaluation"]["max_forgetting"] == 0.05 and job["adapter"]["type"] == "lora"
    # The answer is shaped from the staged row: it must be what reading the job back gives.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=h(alice)).json() == job
    # Committed with no message recorded: a worker's relay sends it (the folder broker here).
    from store.queue import make_celery
    from worker.relay import relay_once

    assert relay_once(settings, make_celery(settings)) == 1
    queue = settings.broker_folder / "queue"
    assert sum(job["id"] in p.read_text() for p in queue.iterdir()) == 1
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=h(alice)).json()
    assert events["data"][0]["message"].startswith("Created fine-tuning job")


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-99"}, "model"),
    ({"training_file": "file-nope"}, "training_file"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": -1}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"method": {"type": "self_distillation",
                 "self_distillation": {"hyperparameters": {"lambda": 1}}}},
     "method.self_distillation.hyperparameters.lambda"),
    ({"method": {"type": "frozen_groups", "frozen_groups": {"hyperparameters": {
        "trainable": ["wings"]}}}}, "method.frozen_groups.hyperparameters.trainable"),
    ({"surprise": True}, "surprise"),
    ({"adapter": {"type": "qlora"}}, "adapter.type"),
    ({"evaluation": {"max_forgetting": 2}}, "evaluation.max_forgetting"),
])
def test_bad_job_bodies_are_400_naming_the_param_and_store_nothing(client, alice, settings,
                                                                     body, param):
    fid = upload(client, alice).json()["id"]
    full = {"model": "driftsafe-factlm-tiny", "training_file": fid, **body}
    r = client.post("/v1/fine_tuning/jobs", headers=h(alice), json=full)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert count(settings, Job) == 0


def test_malformed_json_and_wrong_types_are_4xx_in_the_envelope(client, alice):
    r = client.post("/v1/fine_tuning/jobs",
                    headers=h(alice, **{"Content-Type": "application/json"}),
                    content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/fine_tuning/jobs", headers=h(alice), json=["a", "list"])
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/fine_tuning/jobs", headers=h(alice),
                    json={"model": 5, "training_file": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("model", "training_file")


def test_known_facts_file_must_be_qa(client, alice):
    chat = jsonl([{"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"},
                                {"role": "user", "content": "q2"},
                                {"role": "assistant", "content": "a2"}]}])
    chat_id = upload(client, alice, chat).json()["id"]
    fid = upload(client, alice).json()["id"]
    r = create_job(client, alice, fid, evaluation={"known_facts_file": chat_id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "evaluation.known_facts_file"


def test_pagination_newest_first_with_after_and_limit(client, alice):
    fid = upload(client, alice).json()["id"]
    ids = [create_job(client, alice, fid).json()["id"] for _ in range(5)]
    page1 = client.get("/v1/fine_tuning/jobs?limit=2", headers=h(alice)).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = client.get(f"/v1/fine_tuning/jobs?limit=2&after={page1['last_id']}",
                       headers=h(alice)).json()
    page3 = client.get(f"/v1/fine_tuning/jobs?limit=2&after={page2['last_id']}",
                       headers=h(alice)).json()
    assert [j["id"] for j in page2["data"] + page3["data"]] == ids[::-1][2:]
    assert not page3["has_more"]
    assert client.get("/v1/fine_tuning/jobs?limit=0", headers=h(alice)).status_code == 400


def test_metadata_and_status_filters(client, alice):
    fid = upload(client, alice).json()["id"]
    a = create_job(client, alice, fid, metadata={"team": "search"}).json()["id"]
    create_job(client, alice, fid, metadata={"team": "ads"})
    got = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "search"},
                     headers=h(alice)).json()
    assert [j["id"] for j in got["data"]] == [a]
    client.post(f"/v1/fine_tuning/jobs/{a}/cancel", headers=h(alice))
    got = client.get("/v1/fine_tuning/jobs?status=cancelled", headers=h(alice)).json()
    assert [j["id"] for j in got["data"]] == [a]


def test_cancel_queued_then_cancel_again_is_409(client, alice, settings):
    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h(alice))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h(alice))
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]


def test_cancel_running_sets_the_flag_the_worker_honours(client, alice, settings):
    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    with session_scope(settings) as s:
        s.query(Job).filter_by(id=jid).update({"status": "running"})
    r = client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=h(alice))
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert r.json()["cancel_requested"] is True


def test_file_used_by_an_active_job_cannot_be_deleted(client, alice):
    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    r = client.delete(f"/v1/files/{fid}", headers=h(alice))
    assert r.status_code == 409 and jid in r.json()["error"]["message"]


def test_second_tenant_sees_404_for_every_object_of_the_first(client, alice, bob):
    fid = upload(client, alice).json()["id"]
    jid = create_job(client, alice, fid).json()["id"]
    routes = [("get", f"/v1/files/{fid}"), ("get", f"/v1/files/{fid}/content"),
              ("delete", f"/v1/files/{fid}"), ("get", f"/v1/fine_tuning/jobs/{jid}"),
              ("post", f"/v1/fine_tuning/jobs/{jid}/cancel"),
              ("get", f"/v1/fine_tuning/jobs/{jid}/events"),
              ("get", f"/v1/fine_tuning/jobs/{jid}/checkpoints"),
              ("get", f"/v1/fine_tuning/jobs/{jid}/adapter")]
    for verb, path in routes:
        r = getattr(client, verb)(path, headers=h(bob))
        assert r.status_code == 404, (verb, path, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/fine_tuning/jobs", headers=h(bob)).json()["data"] == []
    assert client.get("/v1/files", headers=h(bob)).json()["data"] == []
    assert create_job(client, bob, fid).json()["error"]["param"] == "training_file"
    # and alice's objects are intact
    assert client.get(f"/v1/fine_tuning/jobs/{jid}", headers=h(alice)).json()["status"] == "queued"


def test_missing_wrong_and_revoked_keys_are_401(client, alice, settings):
    import time

    client.app.state.keys.ttl_s = 0.3  # verified keys are cached this long (key_cache_seconds)
    assert client.get("/v1/files").status_code == 401
    r = client.get("/v1/files", headers={"Authorization": "Bearer dsk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/files", headers=h(alice)).status_code == 200
    with session_scope(settings) as s:
        revoke_key(s, alice["_key_id"])
    time.sleep(0.4)  # a revoked key stops working within the cache period
    assert client.get("/v1/files", headers=h(alice)).status_code == 401


def test_authenticated_read_costs_one_query(client, alice, settings):
    """The key is verified once, then cached: a job read is the one SELECT of the job."""
    from sqlalchemy import event

    fid = upload(client, alice).json()["id"]
    job_id = create_job(client, alice, fid).json()["id"]
    engine = client.app.state.sessions.kw["bind"]
    statements = []

    def count_statement(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count_statement)
    try:
        r = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h(alice))
    finally:
        event.remove(engine, "before_cursor_execute", count_statement)
    assert r.status_code == 200
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1, statements


def test_rate_limit_is_429_with_retry_after(client, alice, bob):
    from api.auth import RateLimiter

    client.app.state.rate_limiter = RateLimiter(per_minute=60, burst=3)
    codes = [client.get("/v1/files", headers=h(alice)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = client.get("/v1/files", headers=h(alice))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.get("/v1/files", headers=h(bob)).status_code == 200  # per tenant


def test_keys_are_stored_only_as_hashes(client, alice, settings):
    from store.models import ApiKey
    key = alice["Authorization"].split()[1]
    with session_scope(settings) as s:
        row = s.query(ApiKey).one()
        assert key not in row.key_hash and len(row.key_hash) == 64


def test_idempotent_replay_returns_the_same_job_and_creates_one(client, alice, settings):
    fid = upload(client, alice).json()["id"]
    body = {"model": "driftsafe-factlm-tiny", "training_file": fid}
    hd = h(alice, **{"Idempotency-Key": "k-1"})
    first = client.post("/v1/fine_tuning/jobs", headers=hd, json=body)
    again = client.post("/v1/fine_tuning/jobs", headers=hd, json=body)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers.get("idempotent-replayed") == "true"
    assert count(settings, Job) == 1
    other = client.post("/v1/fine_tuning/jobs", headers=hd, json={**body, "suffix": "x"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count(settings, Job) == 1


def test_idempotency_keys_are_scoped_per_tenant(client, alice, bob, settings):
    a_file = upload(client, alice, **{"Idempotency-Key": "same"}).json()["id"]
    b_file = upload(client, bob, **{"Idempotency-Key": "same"}).json()["id"]
    assert a_file != b_file and count(settings, StoredFile) == 2
    assert upload(client, alice, **{"Idempotency-Key": "same"}).json()["id"] == a_file


def test_job_and_its_idempotency_record_commit_together(client, alice, settings, monkeypatch):
    """A failure after the job is staged but before the response is stored leaves neither."""
    from store.models import IdempotencyRecord
    fid = upload(client, alice).json()["id"]

    def crash(_body):
        raise RuntimeError("crash between the job and its stored response")

    monkeypatch.setattr("api.idempotency._storable", crash)
    body = {"model": "driftsafe-factlm-tiny", "training_file": fid}
    hd = h(alice, **{"Idempotency-Key": "k-crash"})
    from fastapi.testclient import TestClient
    r = TestClient(client.app, raise_server_exceptions=False).post(
        "/v1/fine_tuning/jobs", headers=hd, json=body)
    assert r.status_code == 500
    assert count(settings, Job) == 0 and count(settings, IdempotencyRecord) == 0
    monkeypatch.undo()
    r = client.post("/v1/fine_tuning/jobs", headers=hd, json=body)  # the key is free again
    assert r.status_code == 200 and count(settings, Job) == 1


def test_concurrent_duplicates_make_one_job_and_get_the_same_answer(client, alice, settings):
    from concurrent.futures import ThreadPoolExecutor
    fid = upload(client, alice).json()["id"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: client.post(
            "/v1/fine_tuning/jobs", headers=h(alice, **{"Idempotency-Key": "race"}),
            json={"model": "driftsafe-factlm-tiny", "training_file": fid}), range(6)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1
    assert count(settings, Job) == 1


def test_stored_webhook_response_keeps_no_secret(client, alice, settings):
    from store.models import IdempotencyRecord, WebhookEndpoint
    hd = h(alice, **{"Idempotency-Key": "wh-1"})
    body = {"url": "https://93.184.215.14/hook"}
    first = client.post("/v1/webhooks", headers=hd, json=body)
    assert first.status_code == 200 and first.json()["secret"].startswith("whsec_")
    with session_scope(settings) as s:
        stored = s.query(IdempotencyRecord).filter_by(key="wh-1").one().response
    assert "secret" not in stored and first.json()["secret"] not in str(stored)
    again = client.post("/v1/webhooks", headers=hd, json=body)
    assert again.json()["id"] == first.json()["id"] and "secret" not in again.json()
    # The key reused for another URL is refused, and neither retry made an endpoint: one
    # registered, one listed (a second, whose secret nobody saw, would sign every event anew).
    other = client.post("/v1/webhooks", headers=hd, json={"url": "https://93.184.215.15/h"})
    assert other.status_code == 422
    listed = client.get("/v1/webhooks", headers=h(alice)).json()["data"]
    assert [w["id"] for w in listed] == [first.json()["id"]]
    with session_scope(settings) as s:
        assert s.query(WebhookEndpoint).count() == 1


def test_models_openapi_and_health(client, alice):
    models = client.get("/v1/models", headers=h(alice)).json()
    assert "driftsafe-factlm-tiny" in [m["id"] for m in models["data"]]
    assert client.get("/v1/models/driftsafe-factlm-tiny", headers=h(alice)).json()["owned_by"]
    assert client.get("/v1/models/nope", headers=h(alice)).status_code == 404
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/cancel",
              "/v1/fine_tuning/jobs/{job_id}/adapter", "/v1/webhooks", "/healthz"):
        assert p in paths
    schemas = spec["components"]["schemas"]
    assert "SelfDistillationHyperparameters" in schemas and "FrozenGroupsHyperparameters" in schemas
    assert client.get("/docs").status_code == 200
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["database"] == "ok"


ROW_STATES = [
    {"status": "queued"},
    {"status": "running", "progress": {"step": 3, "total_steps": 40, "epoch": 1,
                                       "seconds_remaining": 12}},
    {"status": "running", "progress": {"step": 3, "total_steps": 40, "epoch": 0.5,
                                       "seconds_remaining": None}, "cancel_requested": True},
    {"status": "succeeded", "finished_at": 1_800_000_000, "trained_tokens": 1234,
     "fine_tuned_model": "ft:driftsafe-factlm-tiny:x", "result_files": ["file-r"],
     "progress": {"step": 40, "total_steps": 40, "epoch": 2, "seconds_remaining": 0},
     "evaluation": {"forgetting": 0.02, "drift_safe": True, "new_fact_accuracy": 0.9,
                    "knowledge_categories": {"HighlyKnown": 10}}},
    {"status": "failed", "finished_at": 1_800_000_000,
     "error": {"code": "worker_lost", "message": "lost é"}},
    {"status": "failed", "error": {"code": "bad_file", "message": "m", "param": "training_file"}},
    {"status": "failed", "error": {"code": None, "message": "written before codes were ours"}},
    {"status": "cancelled", "metadata": {"team": "ünï"}},
]


@pytest.mark.parametrize("state", ROW_STATES, ids=lambda s: s["status"])
def test_job_object_is_exactly_what_the_model_declares(client, alice, settings, state):
    """job_object builds the dict by hand (for speed): whatever state the worker leaves a row in,
    GET and the list must give what FineTuningJob validates and dumps, and no other keys."""
    from store.public import FineTuningJob

    fid = upload(client, alice).json()["id"]
    job_id = create_job(client, alice, fid, METHODS[1]).json()["id"]
    values = dict(state)
    if "metadata" in values:
        values["job_metadata"] = values.pop("metadata")
    with session_scope(settings) as s:
        s.query(Job).filter(Job.id == job_id).update(values)
    one = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h(alice)).json()
    listed = client.get("/v1/fine_tuning/jobs", headers=h(alice)).json()["data"][0]
    assert one == listed
    # As JSON text, so that 1 and 1.0 differ: the model would coerce what the dict passes on.
    as_model = FineTuningJob.model_validate(one).model_dump(mode="json")
    assert json.dumps(one, sort_keys=True) == json.dumps(as_model, sort_keys=True)
    assert set(one) == set(FineTuningJob.model_fields)
    assert one["status"] == state["status"]
    assert (one["progress"] is not None) == (state["status"] == "running")


def test_json_columns_take_non_finite_floats_and_lone_surrogate_escapes(client, alice, settings):
    """JSON columns go through pydantic-core: a NaN in a report is stored as null (PostgreSQL's
    json type rejects NaN), and text the json module would have written for a lone surrogate
    ("\\ud800") still reads back, in GET and in the list."""
    from sqlalchemy import text

    fid = upload(client, alice).json()["id"]
    job_id = create_job(client, alice, fid).json()["id"]
    with session_scope(settings) as s:
        s.query(Job).filter(Job.id == job_id).update(
            {"evaluation": {"forgetting": float("nan"), "new_fact_accuracy": 0.5}})
    with session_scope(settings) as s:
        s.execute(text("UPDATE jobs SET metadata = :m WHERE id = :id"),
                  {"m": json.dumps({"note": "\ud800"}), "id": job_id})
    one = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h(alice))
    assert one.status_code == 200, one.text
    assert one.json()["evaluation"]["forgetting"] is None
    assert one.json()["evaluation"]["new_fact_accuracy"] == 0.5
    listed = client.get("/v1/fine_tuning/jobs", headers=h(alice))
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == job_id


def test_a_flood_of_unknown_keys_does_not_evict_the_known_ones(monkeypatch):
    """Unknown keys are cached too (a flood of bad keys is not a flood of queries), but the cache
    used to be one bounded dict, cleared whole when full: 10,000 random keys sent every valid
    key back to the database. Known and unknown keys are now kept apart, oldest out first."""
    from types import SimpleNamespace

    import api.auth as auth

    lookups = []

    def tenant_for_digest(_session, digest):
        lookups.append(digest)
        return SimpleNamespace(id="t1", name="alice") if digest == "good" else None

    class NoSession:
        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(auth, "tenant_for_digest", tenant_for_digest)
    monkeypatch.setattr(auth, "MAX_CACHED_KEYS", 100)
    cache = auth.KeyCache(b"secret", ttl_s=30)
    assert cache.cached("good") == (False, None)
    assert cache.load(NoSession, "good").id == "t1"
    for i in range(1000):  # ten times the bound
        assert cache.load(NoSession, f"bad-{i}") is None
    assert cache.cached("good")[0] and cache.cached("good")[1].name == "alice"
    assert cache.cached("bad-999") == (True, None)  # the newest unknown keys are remembered
    assert cache.cached("bad-0") == (False, None)  # the oldest made room
    assert len(lookups) == 1001
