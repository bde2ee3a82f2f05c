"""Uploads and downloads that could hurt the service: size limits on every route (Content-Length
and chunked), an upload that must not stall the event loop or hold the file in memory, odd bytes
and nesting in files, the per-tenant storage quota, and downloads streamed from disk."""

from __future__ import annotations

import io
import json
import threading
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.app import create_app
from store.db import migrate, session_scope
from store.models import Checkpoint, Job, StoredFile
from store.settings import Settings
from tests.api.conftest import QA_LINES, h, jsonl, make_tenant, upload
from tests.live import free_port

BOUNDARY = "driftsafe-test-boundary"


def stored(settings) -> tuple[int, list[Path]]:
    """Rows in `files` and the files on disk under the artifact store."""
    with session_scope(settings) as s:
        rows = s.query(StoredFile).count()
    root = settings.artifacts_dir
    return rows, sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@contextmanager
def app_with(settings, **limits):
    """A TestClient on an app whose settings differ from the fixture's by `limits`."""
    changed = settings.model_copy(update={"rate_limit_per_minute": 0, **limits})
    migrate(changed)
    with TestClient(create_app(changed)) as c:
        yield c, changed


@contextmanager
def served(settings, root_path: str = "", **limits):
    """The app under a real uvicorn (in a thread of this process), for chunked bodies and for
    measuring what the server allocates while a client streams a file from disk. `root_path`:
    served as behind a proxy that strips that prefix (uvicorn puts it back in the path)."""
    changed = settings.model_copy(update={"rate_limit_per_minute": 0, **limits})
    migrate(changed)
    server = uvicorn.Server(uvicorn.Config(create_app(changed), host="127.0.0.1",
                                           port=free_port(), log_level="warning",
                                           root_path=root_path))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", changed
    finally:
        server.should_exit = True
        thread.join(10)


def multipart(data: bytes, name: str = "train.jsonl") -> bytes:
    disposition = "Content-Disposition: form-data; name="
    head = (f'--{BOUNDARY}\r\n{disposition}"purpose"\r\n\r\nfine-tune\r\n'
            f'--{BOUNDARY}\r\n{disposition}"file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def chunked(body: bytes, size: int = 16 * 1024):
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    def gen():
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return gen()


def qa_file(n: int) -> bytes:
    return jsonl({"question": f"Where was Person {i} born ?", "answer": f"City{i}"}
                 for i in range(n))


# --- 1. The upload runs off the event loop, one line at a time -----------------------------------

def test_upload_is_validated_on_bulk_threads_not_the_loop_or_request_threads(settings,
                                                                               monkeypatch):
    """With one request thread, a second upload thread, and an upload held in validation, the
    other requests are still answered: the upload holds neither the event loop nor the request
    thread (before bulk_threads it ran on the request threads and would hold the only one)."""
    from api.routes import files as files_route

    one_thread = settings.model_copy(update={"request_threads": 1, "bulk_threads": 1})
    migrate(one_thread)
    alice = make_tenant(one_thread, "alice")
    entered, release = threading.Event(), threading.Event()
    real = files_route.summarize_lines

    def held(lines):
        entered.set()
        release.wait(30)
        return real(lines)

    monkeypatch.setattr(files_route, "summarize_lines", held)
    with TestClient(create_app(one_thread)) as client, ThreadPoolExecutor(3) as pool:
        threads = client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter())
        assert threads.total_tokens == 1
        pending = pool.submit(upload, client, alice)
        try:
            assert entered.wait(10), "the upload never reached validation"
            # A second upload waits for the upload thread; reads are still answered.
            queued = pool.submit(upload, client, alice)
            for path in ("/v1/files", "/v1/fine_tuning/jobs"):
                other = pool.submit(client.get, path, headers=h(alice))
                assert other.result(timeout=10).status_code == 200
            assert not pending.done() and not queued.done()
        finally:
            release.set()
        assert pending.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200


def upload_traced(settings, path: Path) -> tuple[httpx.Response, int, Settings]:
    """Upload `path` to a live server in this process: (the answer, the peak of memory allocated
    meanwhile, the served settings)."""
    with served(settings) as (url, s):
        key = make_tenant(s, "carol")
        with httpx.Client(base_url=url, timeout=120) as http, open(path, "rb") as f:
            http.get("/v1/files", headers=h(key))  # warm up: imports, pools, caches
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                r = http.post("/v1/files", headers=h(key), data={"purpose": "fine-tune"},
                              files={"file": (path.name, f)})
                return r, tracemalloc.get_traced_memory()[1] - before, s
            finally:
                tracemalloc.stop()


def test_upload_memory_stays_far_below_the_file_size(settings, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(qa_file(60_000))  # about 4 MB
    size = path.stat().st_size
    r, peak, s = upload_traced(settings, path)
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == size and r.json()["lines"] == 60_000
    # The old route held the bytes, their text, the split lines and every parsed example (~11x
    # the file). Now the peak is buffers of fixed size (the 1 MB in-memory part of the spooled
    # upload, the copy's chunk), whatever the file's size.
    assert peak < size, f"peak {peak} bytes while uploading {size}"
    rows, files = stored(s)
    assert rows == 1 and [p.read_bytes() == path.read_bytes() for p in files] == [True]


def test_sha256_and_counts_come_from_one_streamed_pass(client, alice, settings):
    import hashlib

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    data = jsonl(QA_LINES + [chat])
    r = upload(client, alice, data)
    assert r.status_code == 200 and r.json()["lines"] == len(QA_LINES) + 1
    with session_scope(settings) as s:
        row = s.query(StoredFile).one()
        assert row.sha256 == hashlib.sha256(data).hexdigest() and row.bytes == len(data)
        assert row.qa_only is False
    assert client.get(f"/v1/files/{row.id}/content", headers=h(alice)).content == data


# --- 2. and 3. Size limits: uploads and JSON bodies, by Content-Length and chunked --------------

def test_chunked_upload_over_the_limit_is_413_in_the_envelope(settings):
    with served(settings, max_upload_bytes=10_000) as (url, s):
        key = make_tenant(s, "carol")
        with httpx.Client(base_url=url, timeout=60) as http:
            head = h(key, **{"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            # Far over: cut off by the middleware while streaming.
            r = http.post("/v1/files", headers=head, content=chunked(multipart(b"x" * 200_000)))
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "file_too_large"
            assert r.json()["error"]["param"] == "file" and "10000" in r.json()["error"]["message"]
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            # Just over: within the multipart slack, refused by the route's exact check.
            body = b'{"question": "q", "answer": "' + b"a" * 12_000 + b'"}\n'
            r = http.post("/v1/files", headers=head, content=chunked(multipart(body)))
            assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
            # Under: accepted, chunked or not.
            r = http.post("/v1/files", headers=head, content=chunked(multipart(jsonl(QA_LINES))))
            assert r.status_code == 200, r.text
    rows, files = stored(s)
    assert rows == 1 and len(files) == 1


def test_chunked_json_body_over_the_limit_is_413(settings):
    with served(settings, max_json_body_bytes=4096) as (url, s):
        key = make_tenant(s, "carol")
        body = json.dumps({"model": "driftsafe-factlm-tiny", "training_file": "file-x",
                           "metadata": {"k": "v" * 100_000}}).encode()
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/fine_tuning/jobs", content=chunked(body, 1024),
                          headers=h(key, **{"Content-Type": "application/json"}))
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "4096" in error["message"]


@pytest.mark.parametrize("method, path", [
    ("post", "/v1/fine_tuning/jobs"),
    ("post", "/v1/webhooks"),
    ("post", "/v1/fine_tuning/jobs/ftjob-x/cancel"),
    ("get", "/v1/files"),
    ("delete", "/v1/files/file-x"),
])
def test_json_routes_refuse_bodies_over_max_json_body_bytes(settings, method, path):
    big = json.dumps({"model": "driftsafe-factlm-tiny", "pad": "x" * 5000}).encode()
    with app_with(settings, max_json_body_bytes=4096) as (c, s):
        key = make_tenant(s, "carol")
        head = h(key, **{"Content-Type": "application/json"})
        by_length = c.request(method.upper(), path, headers=head, content=big)
        streamed = c.request(method.upper(), path, headers=head, content=chunked(big, 1000))
        for r in (by_length, streamed):
            assert r.status_code == 413, (r.status_code, r.text)
            assert r.json()["error"]["code"] == "request_too_large"
            assert "4096" in r.json()["error"]["message"]
        # The upload route keeps its own, larger limit.
        assert upload(c, key, jsonl(QA_LINES * 100)).status_code == 200


# --- 4. and 5. Nesting, byte order marks and bad bytes in files ----------------------------------

def test_deeply_nested_line_is_400_naming_the_line(client, alice, settings):
    data = jsonl(QA_LINES[:1]) + b"[" * 100_000 + b"\n" + jsonl(QA_LINES[1:])
    r = upload(client, alice, data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and "line 2: not valid JSON (nested too deeply)" in err["message"]
    assert stored(settings) == (0, [])


@pytest.mark.parametrize("depth", [100_000, 5_000, 900, 300, 20])
def test_deeply_nested_json_bodies_are_never_5xx(client, alice, settings, depth):
    nested = "[" * depth + "]" * depth
    for path, body in [
        ("/v1/fine_tuning/jobs", '{"model": "driftsafe-factlm-tiny", "training_file": "file-x", '
                                 f'"integrations": [{{"type": "wandb", "wandb": {nested}}}]}}'),
        ("/v1/fine_tuning/jobs", f'{{"model": {nested}}}'),
        ("/v1/webhooks", f'{{"url": "https://example.com/h", "events": {nested}}}'),
    ]:
        r = client.post(path, headers=h(alice, **{"Content-Type": "application/json"}),
                        content=body.encode())
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if depth > 32:  # refused before parsing, whatever the route's schema would allow
            assert r.json()["error"]["code"] == "invalid_json" and "deeper" in r.text
    with session_scope(settings) as s:
        assert s.query(Job).count() == 0


def test_utf8_byte_order_mark_is_accepted_and_kept(client, alice, settings):
    from trainer.data import load_examples

    data = b"\xef\xbb\xbf" + jsonl(QA_LINES)
    r = upload(client, alice, data)
    assert r.status_code == 200, r.text
    assert r.json()["lines"] == len(QA_LINES) and r.json()["bytes"] == len(data)
    fid = r.json()["id"]
    assert client.get(f"/v1/files/{fid}/content", headers=h(alice)).content == data
    # The worker reads the stored bytes by the same rules.
    (path,) = stored(settings)[1]
    assert len(load_examples(path)) == len(QA_LINES)


@pytest.mark.parametrize("data, line", [
    (jsonl(QA_LINES[:1]) + b'{"question": "q", "answer": "\xff\xfe"}\n', 2),
    (b'{"question": "caf\xe9", "answer": "a"}\n' + jsonl(QA_LINES), 1),
    (jsonl(QA_LINES) + b"\xef\xbb\xbf" + jsonl(QA_LINES[:1]), len(QA_LINES) + 1),  # BOM mid-file
    (jsonl(QA_LINES[:2]) + b'{"question": "q", "answer": "\xed\xa0\x80"}\n', 3),  # surrogate
])
def test_bytes_that_are_not_utf8_are_400_naming_the_line(client, alice, settings, data, line):
    r = upload(client, alice, data)
    assert r.status_code == 400, r.text
    assert f"line {line}: " in r.json()["error"]["message"]
    assert stored(settings) == (0, [])


def test_line_separators_inside_strings_do_not_split_lines(client, alice, settings):
    from trainer.data import load_examples

    rows = [{"question": "Who said \u2028 this \u0085 ?", "answer": "Ana\u2029Bo"}] + QA_LINES
    data = ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n").encode()
    r = upload(client, alice, data)
    assert r.status_code == 200 and r.json()["lines"] == len(rows), r.text
    (path,) = stored(settings)[1]
    assert load_examples(path)[0].answers == ("Ana\u2029Bo",)


# --- 6. Storage quota --------------------------------------------------------------------------

def test_upload_over_the_storage_quota_is_429_and_stores_nothing(settings):
    one = len(jsonl(QA_LINES))
    with app_with(settings, max_storage_bytes=2 * one + 10) as (c, s):
        carol, dave = make_tenant(s, "carol"), make_tenant(s, "dave")
        first = upload(c, carol).json()["id"]
        second = upload(c, carol, **{"Idempotency-Key": "second"})
        assert second.status_code == 200
        # At the quota now, a retry of a request that succeeded still replays its answer.
        again = upload(c, carol, **{"Idempotency-Key": "second"})
        assert again.status_code == 200 and again.json() == second.json()
        r = upload(c, carol, **{"Idempotency-Key": "third"})
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "quota_storage_bytes" and str(2 * one + 10) in err["message"]
        assert stored(s)[0] == 2 and len(stored(s)[1]) == 2
        assert upload(c, dave).status_code == 200  # per tenant
        # Deleting a file frees its bytes; the refused key was not kept, so it can be retried.
        assert c.delete(f"/v1/files/{first}", headers=h(carol)).status_code == 200
        assert upload(c, carol, **{"Idempotency-Key": "third"}).status_code == 200


# PostgreSQL only: SQLite (the laptop setup) has no row locks, and concurrent uploads of one
# tenant may overshoot the quota there.
@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
def test_concurrent_uploads_cannot_both_pass_the_quota(settings):
    one = len(jsonl(QA_LINES))
    with app_with(settings, max_storage_bytes=3 * one) as (c, s):
        carol = make_tenant(s, "carol")
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _: upload(c, carol).status_code, range(6)))
    assert codes == [200, 200, 200, 429, 429, 429]
    rows, files = stored(s)
    assert rows == 3 and len(files) == 3


# --- 7. Downloads stream from disk ---------------------------------------------------------------

def test_file_content_is_streamed_not_read_whole(client, alice, monkeypatch):
    data = qa_file(20_000)
    fid = upload(client, alice, data).json()["id"]

    def whole(self):
        raise AssertionError(f"read {self} whole into memory")

    monkeypatch.setattr(Path, "read_bytes", whole)
    r = client.get(f"/v1/files/{fid}/content", headers=h(alice))
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))


def test_a_slow_reader_of_a_download_holds_no_database_connection(settings):
    """A client that reads a download slowly (here: not at all, after the status line) keeps the
    response streaming; its request's database connection must be back in the pool meanwhile.
    It used to be held until the last byte was sent: 50 such readers took every connection, and
    every request after them waited 10 s for one and failed."""
    import socket

    from store.db import session_factory

    with served(settings) as (url, changed):
        key = make_tenant(changed, "carol")
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/files", headers=h(key), data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", jsonl(QA_LINES))})
            assert r.status_code == 200, r.text
            fid = r.json()["id"]
        with session_scope(changed) as s:  # far more than the socket buffers take
            path = changed.artifacts_dir / s.query(StoredFile).filter_by(id=fid).one().storage_path
        path.write_bytes(b"x" * (64 << 20))
        pool = session_factory(changed).kw["bind"].pool
        readers = []
        for _ in range(3):
            reader = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.sendall(f"GET /v1/files/{fid}/content HTTP/1.1\r\nHost: x\r\n"
                           f"Authorization: {h(key)['Authorization']}\r\n\r\n".encode())
            assert reader.recv(12) == b"HTTP/1.1 200"
            readers.append(reader)
        time.sleep(0.5)
        try:
            assert pool.checkedout() == 0
        finally:
            for reader in readers:
                reader.close()


def test_missing_content_is_404_not_500(client, alice, settings):
    fid = upload(client, alice).json()["id"]
    for p in stored(settings)[1]:
        p.unlink()
    r = client.get(f"/v1/files/{fid}/content", headers=h(alice))
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_content_missing"


def fake_checkpoint(client, alice, settings, step: int = 3) -> tuple[str, Path]:
    """A job with one checkpoint whose adapter files are on disk, as the worker leaves them."""
    fid = upload(client, alice).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=h(alice), json={
        "model": "driftsafe-factlm-tiny", "training_file": fid}).json()["id"]
    with session_scope(settings) as s:
        job = s.query(Job).filter_by(id=jid).one()
        rel = f"{job.tenant_id}/jobs/{jid}/checkpoints/step-{step:06d}"
        s.add(Checkpoint(tenant_id=job.tenant_id, job_id=jid, step_number=step, storage_path=rel,
                         metrics={"heldout_known_accuracy": 0.9}, drift_safe=True))
    folder = settings.artifacts_dir / rel / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 400)
    return jid, settings.artifacts_dir / rel


def test_adapter_zip_is_built_once_stored_and_reused(client, alice, settings, monkeypatch):
    jid, ckpt_dir = fake_checkpoint(client, alice, settings)
    r = client.get(f"/v1/fine_tuning/jobs/{jid}/adapter", headers=h(alice))
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f"{jid}-step3.zip" in r.headers["content-disposition"]
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert set(zf.namelist()) == {"adapter_config.json", "adapter_model.safetensors",
                                  "driftsafe.json"}
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert zf.read("adapter_model.safetensors") == bytes(range(256)) * 400
    assert json.loads(zf.read("driftsafe.json"))["checkpoint"]["step_number"] == 3
    kept = [p for p in ckpt_dir.iterdir() if p.is_file()]
    assert [p.name for p in kept] == ["adapter.zip"]  # no temporary left behind
    assert kept[0].read_bytes() == r.content

    def no_rebuild(*_a, **_k):
        raise AssertionError("the adapter zip was built again")

    monkeypatch.setattr(zipfile, "ZipFile", no_rebuild)
    again = client.get(f"/v1/fine_tuning/jobs/{jid}/adapter", headers=h(alice),
                       params={"select": "drift_safe"})
    assert again.status_code == 200 and again.content == r.content


def test_one_request_thread_serves_a_burst_of_mixed_requests(settings):
    """Nothing a route does waits for a second request thread: with one, a burst of concurrent
    reads, lists, keyed creations (duplicates among them), cancels and uploads all finish."""
    one_thread = settings.model_copy(update={"request_threads": 1, "bulk_threads": 1,
                                             "rate_limit_per_minute": 0})
    migrate(one_thread)
    alice = make_tenant(one_thread, "alice")
    with TestClient(create_app(one_thread)) as client, ThreadPoolExecutor(12) as pool:
        fid = upload(client, alice).json()["id"]
        body = {"model": "driftsafe-factlm-tiny", "training_file": fid}
        job = client.post("/v1/fine_tuning/jobs", headers=h(alice), json=body).json()["id"]
        calls = []
        for i in range(6):
            calls += [
                ("GET", f"/v1/fine_tuning/jobs/{job}", None, {}),
                ("GET", "/v1/fine_tuning/jobs?limit=5", None, {}),
                ("GET", f"/v1/fine_tuning/jobs/{job}/events", None, {}),
                ("POST", "/v1/fine_tuning/jobs", body, {"Idempotency-Key": f"k{i % 3}"}),
            ]
        calls.append(("POST", f"/v1/fine_tuning/jobs/{job}/cancel", None, {}))

        def send(call):
            method, path, json_body, headers = call
            return client.request(method, path, json=json_body, headers=h(alice, **headers))

        futures = [pool.submit(send, c) for c in calls]
        futures += [pool.submit(upload, client, alice) for _ in range(3)]
        statuses = [f.result(timeout=60).status_code for f in futures]
    assert set(statuses) <= {200, 409}, statuses  # 409: a cancel of an already-ended job
    assert statuses.count(200) >= len(futures) - 1
    with session_scope(one_thread) as s:
        assert s.query(Job).count() == 1 + 3  # three distinct keys, however many duplicates


@pytest.mark.parametrize("path, module, name", [
    ("/v1/fine_tuning/jobs/{job}/report.png", "api.charts", "report_png"),
    ("/v1/fine_tuning/jobs/{job}/adapter", "api.adapters", "pick_checkpoint"),
], ids=["report-image", "adapter-download"])
def test_slow_downloads_run_on_bulk_threads(settings, monkeypatch, path, module, name):
    """Drawing a report image and building an adapter zip take seconds: held in the middle,
    with one request thread, job reads are still answered."""
    import importlib

    one_thread = settings.model_copy(update={"request_threads": 1, "bulk_threads": 1})
    migrate(one_thread)
    alice = make_tenant(one_thread, "alice")
    target = importlib.import_module(module)
    real, entered, release = getattr(target, name), threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, held)
    with TestClient(create_app(one_thread)) as client, ThreadPoolExecutor(2) as pool:
        fid = upload(client, alice).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", headers=h(alice), json={
            "model": "driftsafe-factlm-tiny", "training_file": fid}).json()["id"]
        slow = pool.submit(client.get, path.format(job=job), headers=h(alice))
        try:
            assert entered.wait(10), "the slow route never started"
            read = pool.submit(client.get, f"/v1/fine_tuning/jobs/{job}", headers=h(alice))
            assert read.result(timeout=10).status_code == 200
            assert not slow.done()
        finally:
            release.set()
        assert slow.result(timeout=60).status_code in (200, 404)  # 404: no checkpoint yet


@pytest.mark.parametrize("authorization", [None, "Bearer sk-not-a-key", "Basic abc"])
def test_an_upload_without_a_valid_key_is_401_before_its_body_is_read(client, alice, settings,
                                                                     authorization):
    """FastAPI parses a form (spooling it to disk) before the route's dependencies check the
    key: an unauthenticated client could make the API read and store 512 MB per request."""
    pulled = []

    def body():
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\""
        yield boundary + b"\r\n\r\n"
        for _ in range(64):
            pulled.append(1)
            yield jsonl(QA_LINES) * 50
        yield b"\r\n--b--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    if authorization:
        headers["Authorization"] = authorization
    r = client.post("/v1/files", headers=headers, content=body())
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert len(pulled) <= 1, f"{len(pulled)} of 64 chunks read before the 401"
    assert stored(settings) == (0, [])


def test_downloads_serve_byte_ranges_and_answer_bad_ones_as_declared(client, alice, settings):
    """A Range request gets its bytes (206: an adapter download can resume), a range past the
    end 416 in the envelope, and a Range header that does not parse is ignored (the whole file):
    Starlette answered that with a plain-text 400 the document did not describe."""
    data = qa_file(200)
    fid = upload(client, alice, data).json()["id"]
    url = f"/v1/files/{fid}/content"
    part = client.get(url, headers=h(alice, Range="bytes=10-19"))
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    past = client.get(url, headers=h(alice, Range=f"bytes={len(data) + 5}-"))
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    assert past.json()["error"]["code"] == "range_not_satisfiable"
    for odd in ("items=0-1", "bytes", "bytes=5-2", "bytes=x-y"):
        whole = client.get(url, headers=h(alice, Range=odd))
        assert whole.status_code == 200 and whole.content == data, odd
    # If-Range: a client whose copy is another version gets the whole file, whatever its range
    # (a range past the end of the old copy was 416), and a current one its range.
    etag = part.headers["etag"]
    for version, status in (('"another-version"', 200), (etag, 416)):
        again = client.get(url, headers=h(alice, Range=f"bytes={len(data) + 5}-",
                                          **{"If-Range": version}))
        assert again.status_code == status, (version, again.text[:200])
        assert status == 416 or again.content == data
    resume = client.get(url, headers=h(alice, Range="bytes=10-19", **{"If-Range": etag}))
    assert resume.status_code == 206 and resume.content == data[10:20]
    jid, _ = fake_checkpoint(client, alice, settings)
    zipped = client.get(f"/v1/fine_tuning/jobs/{jid}/adapter", headers=h(alice)).content
    tail = client.get(f"/v1/fine_tuning/jobs/{jid}/adapter", headers=h(alice, Range="bytes=-100"))
    assert tail.status_code == 206 and tail.content == zipped[-100:]


def test_a_body_sent_to_a_route_that_takes_none_is_still_bounded(client, alice):
    """The body limiter reads every request's body: on a route without one, too large is 413
    and nested too deep is 400, both in the envelope and both in the OpenAPI document."""
    fid = upload(client, alice).json()["id"]
    doc = client.get("/openapi.json").json()
    declared = doc["paths"]["/v1/files/{file_id}"]["delete"]["responses"]
    big = client.request("DELETE", f"/v1/files/{fid}", headers=h(alice), content=b"x" * 2**21)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    deep = client.request("GET", "/v1/models", headers=h(alice), content=b"[" * 40 + b"]" * 40)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    assert {"400", "413"} <= set(declared)
    assert {"400", "413"} <= set(doc["paths"]["/v1/models"]["get"]["responses"])


def test_a_line_past_the_limit_of_one_example_is_400_without_being_held(settings, tmp_path,
                                                                        monkeypatch):
    """A file with no newline in it was one line, read whole and then decoded and parsed:
    several times its size in memory. A line is now read up to the limit of one example (made
    small here, so that the file can be many times it)."""
    from trainer import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", MAX_LINE_BYTES := 256 * 1024)
    path = tmp_path / "one-line.jsonl"
    good = jsonl(QA_LINES[:1])
    path.write_bytes(good + b'{"question": "' + b"x" * (40 * MAX_LINE_BYTES) + b'"}\n' + good)
    size = path.stat().st_size
    r, peak, s = upload_traced(settings, path)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"line 2: longer than {MAX_LINE_BYTES} bytes" in message and "line 3" not in message
    assert peak < size / 3, f"peak {peak} bytes while uploading {size}"
    assert stored(s) == (0, [])


def test_uploads_keep_their_limit_behind_a_path_prefix(settings):
    """Served under a prefix (uvicorn --root-path /api), the request's path carries it: the body
    limiter took /api/v1/files for a JSON route, so a 2 MB upload got the 1 MB JSON limit and
    skipped the early key check."""
    data = qa_file(40_000)
    assert len(data) > 2 * settings.max_json_body_bytes
    with served(settings, root_path="/api") as (url, changed):
        key = make_tenant(changed, "carol")
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/files", headers=h(key), data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", data)})
            assert r.status_code == 200, r.text
            assert http.get(f"/v1/files/{r.json()['id']}/content",
                            headers=h(key)).content == data
