"""Webhooks cannot hurt the service: no calls into private networks (at registration or at
delivery), a wall-clock deadline per delivery with the reply body never read, a sender apart from
the reaper, and rows claimed so that two workers never send the same one. Receivers are real
local HTTP servers; DNS is faked so that no test depends on the network."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from store.db import engine_for, migrate, session_scope
from store.models import Job, Tenant, WebhookDelivery, WebhookEndpoint
from store.netguard import RefusedURL, resolve
from store.settings import Settings
from tests.api.conftest import PG_ADMIN, h, make_tenant
from worker.reaper import reap_once
from worker.webhooks import (
    LEASE_MARGIN_S,
    claim_due,
    pinned_request,
    record,
    send_due,
    start_sender,
)

SECRET = "whsec_test"


# --- fixtures: fake DNS, stores, receivers ---------------------------------------------------

class FakeDNS:
    """`answers`: name -> [addresses], or a callable returning them. Address literals resolve as
    usual and any other name does not resolve. `lookups` counts lookups per name."""

    def __init__(self):
        self.answers: dict = {}
        self.lookups: dict[str, int] = {}
        self.real = socket.getaddrinfo

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        self.lookups[host] = self.lookups.get(host, 0) + 1
        if host not in self.answers:
            return self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        answer = self.answers[host]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in (answer() if callable(answer) else answer)]


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def make_settings(tmp_path, kind="sqlite", **values) -> Settings:
    values = {"data_dir": tmp_path / "data", "secret_key": "test-secret", **values}
    if kind == "postgresql":
        name = f"driftsafe_t_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        values["database_url"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    settings = Settings(**values)
    migrate(settings)
    return settings


def drop_database(settings: Settings) -> None:
    if settings.database_url:
        engine_for(settings.database_url).dispose()
        name = settings.database_url.rsplit("/", 1)[-1]
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_deliveries(settings: Settings, urls: list[str], tenant: str | None = None) -> list[int]:
    """One endpoint and one due delivery per URL (of the first tenant, or of the one named);
    returns the delivery ids in order."""
    with session_scope(settings) as s:
        named = select(Tenant) if tenant is None else select(Tenant).where(Tenant.name == tenant)
        tenant = s.scalar(named) or Tenant(name=tenant or "t")
        s.add(tenant)
        s.flush()
        deliveries = []
        for url in urls:
            endpoint = WebhookEndpoint(tenant_id=tenant.id, url=url, secret=SECRET,
                                       events=["fine_tuning.job.succeeded"])
            s.add(endpoint)
            s.flush()
            deliveries.append(WebhookDelivery(
                tenant_id=tenant.id, endpoint_id=endpoint.id, event="fine_tuning.job.succeeded",
                payload={"object": "event", "data": {"url": url}},
                next_attempt_at=time.time() - 1))
        s.add_all(deliveries)
        s.flush()
        return [d.id for d in deliveries]


def delivery_rows(settings: Settings) -> dict:
    D = WebhookDelivery
    with session_scope(settings) as s:
        return {r.id: r for r in s.execute(select(D.id, D.attempts, D.delivered_at, D.gave_up,
                                                  D.last_error, D.next_attempt_at))}


class Receiver(BaseHTTPRequestHandler):
    """Records (monotonic time, headers, body) per POST and answers 204 after `delay` seconds."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - http.server's name
        arrived = time.monotonic()
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.got.append((arrived, self.headers, body))  # case-insensitive
        time.sleep(self.server.delay)
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@contextmanager
def receiver(delay: float = 0.0):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.got, server.delay, server.daemon_threads = [], delay, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def raw_server(handle):
    """A TCP server that runs handle(conn, stop) per connection; for misbehaving endpoints."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop, accepted = threading.Event(), threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed at the end of the test
            accepted.set()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    def serve(conn):
        with conn:
            try:
                handle(conn, stop)
            except OSError:
                pass  # the sender hung up on us: that is the point

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        listener.close()


def never_answers(conn, stop):
    stop.wait()


def endless_body(conn, stop):
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")


def trickles_headers(conn, stop):
    conn.recv(65536)
    for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"y" * 10_000:
        if stop.wait(0.05):
            return
        conn.sendall(bytes([byte]))


# --- 1. SSRF: registration ---------------------------------------------------------------------

@pytest.fixture
def api(tmp_path, dns):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        yield client, make_tenant(settings, "alice")


BAD_URLS = [
    ("http://127.0.0.1:8000/h", "loopback"),
    ("http://localhost/h", "loopback"),
    ("http://[::1]/h", "loopback"),
    ("http://2130706433/h", "loopback"),  # 127.0.0.1 as one number
    ("http://0x7f.1/h", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/h", "link-local"),
    ("http://10.0.0.5/h", "private"),
    ("http://172.16.3.4/h", "private"),
    ("http://192.168.1.1/h", "private"),
    ("http://[fd12:3456::1]/h", "private"),
    ("http://100.64.0.1/h", "non-public"),  # carrier-grade NAT
    ("http://224.0.0.1/h", "multicast"),
    ("http://[ff02::1]/h", "multicast"),
    ("http://0.0.0.0/h", "unspecified"),
    ("http://[::]/h", "unspecified"),
    ("http://[::ffff:127.0.0.1]/h", "loopback"),
    ("http://[::ffff:169.254.169.254]/h", "link-local"),
    ("http://[64:ff9b::a00:5]/h", "private"),  # NAT64 of 10.0.0.5
    ("http://[2002:c0a8:101::1]/h", "private"),  # 6to4 of 192.168.1.1
    ("http://[::7f00:1]/h", "reserved"),  # deprecated IPv4-compatible
    ("http://[::ffff:0:7f00:1]/h", "loopback"),  # IPv4-translated 127.0.0.1
    ("http://[::ffff:0:a9fe:a9fe]/h", "link-local"),  # IPv4-translated 169.254.169.254
    ("http://[fec0::1]/h", "site-local"),  # deprecated site-local
    ("http://internal.example/h", "resolves to 10.1.2.3, which is a private"),
    ("http://mixed.example/h", "resolves to 127.0.0.1"),  # one bad address is enough
    ("http://nowhere.example/h", "does not resolve"),
    ("https://user:secret@public.example/h", "credentials"),
    ("http://public.example:0/h", "Port 0"),
]
NAMES = {"localhost": ["127.0.0.1"], "internal.example": ["10.1.2.3"],
         "mixed.example": ["93.184.216.34", "127.0.0.1"], "public.example": ["93.184.216.34"]}


@pytest.mark.parametrize("url, says", BAD_URLS)
def test_registration_refuses_urls_that_do_not_reach_a_public_address(api, dns, url, says):
    """400 on `url`, from whichever layer sees it first (the schema's pattern or netguard)."""
    client, alice = api
    dns.answers.update(NAMES)
    r = client.post("/v1/webhooks", headers=h(alice), json={"url": url})
    assert r.status_code == 400 and r.json()["error"]["param"] == "url", r.text
    assert client.get("/v1/webhooks", headers=h(alice)).json()["data"] == []


@pytest.mark.parametrize("url, says", BAD_URLS)
def test_the_address_policy_says_what_is_wrong(dns, url, says):
    """The same policy guards delivery, where rows registered earlier never met the schema."""
    dns.answers.update(NAMES)
    with pytest.raises(RefusedURL, match=re.escape(says)):
        resolve(url, allow_private=False)


def test_registration_says_what_a_name_resolves_to(api, dns):
    client, alice = api
    dns.answers.update(NAMES)
    for url, says in [("http://internal.example/h", "'internal.example' resolves to 10.1.2.3, "
                                                    "which is a private address"),
                      ("https://nowhere.example/h", "does not resolve")]:
        r = client.post("/v1/webhooks", headers=h(alice), json={"url": url})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_registration_accepts_public_names_and_private_addresses_only_when_allowed(
        api, dns, tmp_path):
    client, alice = api
    dns.answers["hooks.example.com"] = ["93.184.216.34", "2606:2800:220:1::1"]
    r = client.post("/v1/webhooks", headers=h(alice), json={"url": "https://hooks.example.com/h"})
    assert r.status_code == 200 and r.json()["secret"].startswith("whsec_")
    allowed = make_settings(tmp_path / "open", webhook_allow_private=True)
    with TestClient(create_app(allowed)) as open_client:
        r = open_client.post("/v1/webhooks", headers=h(make_tenant(allowed, "bob")),
                             json={"url": "http://127.0.0.1:9/h"})
    assert r.status_code == 200


def test_a_name_that_never_resolves_is_refused_at_the_deadline_holding_no_request_thread(
        tmp_path, monkeypatch):
    """A nameserver that never answers: with one request thread, the registration is refused
    once webhook_deadline_seconds pass, and other requests are answered meanwhile (the lookup
    once held the only request thread for the resolver's whole timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    released = threading.Event()

    def never_answers(host, *args, **kwargs):
        released.wait(30)
        raise socket.gaierror("timed out")

    monkeypatch.setattr(socket, "getaddrinfo", never_answers)
    settings = make_settings(tmp_path, request_threads=1, webhook_deadline_seconds=1.0)
    try:
        with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
            alice = make_tenant(settings, "alice")
            started = time.monotonic()
            hook = pool.submit(client.post, "/v1/webhooks", headers=h(alice),
                               json={"url": "https://slow.example/h"})
            time.sleep(0.2)
            other = pool.submit(client.get, "/v1/webhooks", headers=h(alice))
            assert other.result(timeout=5).status_code == 200
            r = hook.result(timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == "url", r.text
            assert "did not resolve within 1 s" in r.json()["error"]["message"]
            assert time.monotonic() - started < 5
            assert client.get("/v1/webhooks", headers=h(alice)).json()["data"] == []
    finally:
        released.set()


def test_one_tenant_s_unresolvable_names_hold_at_most_two_lookups(tmp_path, monkeypatch):
    """Lookups past their deadline still hold a thread until the resolver gives up: a tenant
    may hold two, its third registration is 429 at once, and another tenant still registers."""
    from concurrent.futures import ThreadPoolExecutor

    from api.routes import webhooks as route

    released = threading.Event()

    def resolver(host, *args, **kwargs):
        if host == "slow.example":
            released.wait(30)
            raise socket.gaierror("timed out")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    settings = make_settings(tmp_path, webhook_deadline_seconds=0.5)
    try:
        with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
            alice, bob = make_tenant(settings, "alice"), make_tenant(settings, "bob")
            slow = {"url": "https://slow.example/h"}
            first = [pool.submit(client.post, "/v1/webhooks", headers=h(alice), json=slow)
                     for _ in range(route.LOOKUPS.per_tenant)]
            assert [f.result(timeout=10).status_code for f in first] == [400, 400]
            third = client.post("/v1/webhooks", headers=h(alice), json=slow)
            assert third.status_code == 429 and third.headers["retry-after"], third.text
            ok = client.post("/v1/webhooks", headers=h(bob), json={"url": "https://ok.example/h"})
            assert ok.status_code == 200, ok.text
            released.set()  # the resolver gives up: alice's lookups are hers again
            deadline = time.monotonic() + 10
            while route.LOOKUPS.held() and time.monotonic() < deadline:
                time.sleep(0.05)
            again = client.post("/v1/webhooks", headers=h(alice),
                                json={"url": "https://ok.example/h"})
            assert again.status_code == 200, again.text
    finally:
        released.set()


# --- 1. SSRF: delivery -------------------------------------------------------------------------

def test_delivery_refuses_a_name_that_now_resolves_to_a_private_address(api, dns, tmp_path):
    """DNS rebinding: public when registered, loopback when sent. Nothing reaches the receiver."""
    client, alice = api
    settings = client.app.state.settings
    with receiver() as server:
        url = f"http://rebind.example:{server.server_port}/h"
        dns.answers["rebind.example"] = ["93.184.216.34"]
        assert client.post("/v1/webhooks", headers=h(alice), json={"url": url}).status_code == 200
        dns.answers["rebind.example"] = ["127.0.0.1"]
        [delivery] = add_deliveries(settings, [url])
        send_due(settings)
        assert server.got == []
    row = delivery_rows(settings)[delivery]
    assert row.delivered_at is None and row.attempts == 1 and not row.gave_up
    assert "refused" in row.last_error and "127.0.0.1" in row.last_error
    assert row.next_attempt_at > time.time()  # backs off like any failure


def test_delivery_connects_to_the_address_it_checked_with_the_original_host(dns, tmp_path):
    """The name is looked up once per delivery; a second lookup (by httpx) would get an address
    nothing listens on. The receiver still sees the original Host, and a valid signature."""
    settings = make_settings(tmp_path, webhook_allow_private=True)
    answers = iter([["127.0.0.1"]])
    dns.answers["hooks.test"] = lambda: next(answers, ["10.255.255.1"])
    with receiver() as server:
        [delivery] = add_deliveries(settings, [f"http://hooks.test:{server.server_port}/h"])
        send_due(settings)
    assert delivery_rows(settings)[delivery].delivered_at is not None
    assert dns.lookups["hooks.test"] == 1
    _, headers, body = server.got[0]
    assert headers["Host"] == f"hooks.test:{server.server_port}"
    ts = headers["driftsafe-timestamp"]
    assert headers["driftsafe-signature"] == "v1=" + hmac.new(
        SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def test_https_keeps_the_name_for_sni_and_certificate_checks(dns):
    dns.answers["hooks.example.com"] = ["93.184.216.34"]
    url, headers, extensions = pinned_request(resolve("https://hooks.example.com:8443/a?b=1",
                                                      allow_private=False))
    assert str(url) == "https://93.184.216.34:8443/a?b=1"
    assert headers == {"host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    url, headers, extensions = pinned_request(resolve("https://[2606:2800:220:1::1]/h", False))
    assert str(url) == "https://[2606:2800:220:1::1]/h" and extensions == {}


# --- 2. Deadlines: misbehaving endpoints delay no one --------------------------------------------

DEADLINE = 2.0


def test_each_delivery_has_a_wall_clock_deadline_and_the_body_is_never_read(tmp_path):
    settings = make_settings(tmp_path, webhook_allow_private=True,
                             webhook_deadline_seconds=DEADLINE)
    with raw_server(never_answers) as (hang, _), raw_server(endless_body) as (endless, _), \
            raw_server(trickles_headers) as (trickle, _), receiver() as good:
        urls = [f"http://127.0.0.1:{p}/h" for p in (hang, endless, trickle, good.server_port)]
        ids = dict(zip(["hang", "endless", "trickle", "good"], add_deliveries(settings, urls)))
        started = time.monotonic()
        send_due(settings)
        took = time.monotonic() - started
    rows = {name: delivery_rows(settings)[i] for name, i in ids.items()}
    good_after = good.got[0][0] - started
    print(f"\npass {took:.2f} s (deadline {DEADLINE} s); good endpoint reached after "
          f"{good_after * 1000:.0f} ms")
    assert good_after < DEADLINE / 2  # sent at once, not after the hanging ones
    assert rows["good"].delivered_at is not None
    # 200 and then an endless body: the status line is all we need; the body is never read.
    assert rows["endless"].delivered_at is not None
    for name in ("hang", "trickle"):
        assert rows[name].delivered_at is None and not rows[name].gave_up
        assert "deadline" in rows[name].last_error, rows[name].last_error
    assert DEADLINE * 0.9 < took < DEADLINE + 1.0


def test_one_tenant_s_unresolvable_hosts_do_not_hold_up_another_s_deliveries(tmp_path, dns):
    """A lookup stuck past its deadline holds its thread until the resolver gives up. Tenant
    A's endpoints all name hosts that never answer; tenant B's deliveries must still go out in
    the same pass (they waited behind A's lookups on the worker's four lookup threads)."""
    settings = make_settings(tmp_path, webhook_allow_private=True,
                             webhook_deadline_seconds=DEADLINE)
    answer = threading.Event()
    dns.answers["stuck.example"] = lambda: (answer.wait(30), ["93.184.216.34"])[1]
    try:
        with receiver() as good:
            stuck = add_deliveries(settings, ["http://stuck.example/h"] * 8, tenant="a")
            fine = add_deliveries(settings, [f"http://127.0.0.1:{good.server_port}/h"] * 3,
                                  tenant="b")
            send_due(settings)
        rows = delivery_rows(settings)
        assert all(rows[i].delivered_at is not None for i in fine), [
            rows[i].last_error for i in fine]
        assert all(rows[i].delivered_at is None for i in stuck)
        assert dns.lookups["stuck.example"] <= 2  # A held two lookup threads, not all of them
    finally:
        answer.set()


def test_a_hanging_webhook_does_not_delay_requeueing(tmp_path):
    settings = make_settings(tmp_path, webhook_allow_private=True, webhook_deadline_seconds=30,
                             stale_after_seconds=30)
    with session_scope(settings) as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, model="m", training_file="f", spec={}, status="running",
                  heartbeat_at=time.time() - 100, attempts=1, worker_id="w")
        s.add(job)
    stop = threading.Event()
    with raw_server(never_answers) as (hang, accepted):
        add_deliveries(settings, [f"http://127.0.0.1:{hang}/h"])
        sender = start_sender(settings, every_s=0.1, stop=stop)
        assert accepted.wait(10), "the sender never connected"
        started = time.monotonic()
        reap_once(settings)  # while the delivery hangs
        took = time.monotonic() - started
        assert sender.is_alive()  # still stuck in the delivery
        stop.set()
    print(f"\nreap_once took {took * 1000:.0f} ms during a hanging delivery")
    assert took < 2.0
    with session_scope(settings) as s:
        assert s.scalar(select(Job.status)) == "queued"


# --- 3. Claims: two senders never send the same row ----------------------------------------------

@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_concurrent_senders_deliver_each_row_exactly_once(tmp_path, kind):
    settings = make_settings(tmp_path, kind, webhook_allow_private=True)
    try:
        with receiver(delay=0.02) as server:
            ids = add_deliveries(settings, [f"http://127.0.0.1:{server.server_port}/h"] * 40)
            start = threading.Barrier(2)
            claimed = []

            def sender():
                start.wait()
                while n := len(send_due(settings, limit=5)):
                    claimed.append(n)

            threads = [threading.Thread(target=sender) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        sent = [int(headers["driftsafe-delivery"]) for _, headers, _ in server.got]
        assert sorted(sent) == sorted(ids)  # every row once: none twice, none missed
        assert sum(claimed) == len(ids)
        rows = delivery_rows(settings)
        assert all(r.delivered_at is not None and r.attempts == 1 for r in rows.values())
    finally:
        drop_database(settings)


def test_a_sender_that_dies_mid_delivery_leaves_the_row_for_after_its_lease(tmp_path, monkeypatch):
    settings = make_settings(tmp_path, webhook_allow_private=True, webhook_deadline_seconds=5)
    [delivery] = add_deliveries(settings, ["http://127.0.0.1:9/h"])
    [first] = claim_due(settings)  # ... and then this sender dies without recording anything
    assert first.lease == pytest.approx(time.time() + 5 + LEASE_MARGIN_S, abs=2)
    assert claim_due(settings) == []  # leased: no other sender takes it meanwhile
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 5 + LEASE_MARGIN_S + 1)
    [second] = claim_due(settings)
    assert second.id == delivery and second.attempts == 2
    record(settings, [first], [(True, "HTTP 204")])  # too late: the row is no longer its own
    record(settings, [second], [(False, "HTTP 500")])
    row = delivery_rows(settings)[delivery]
    assert row.delivered_at is None and row.last_error == "HTTP 500" and row.attempts == 2


# --- 5. One tenant cannot crowd out the others ---------------------------------------------------

@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_batch_takes_a_few_rows_of_each_tenant_not_one_tenants_backlog(tmp_path, kind):
    """A batch waits for its slowest delivery: one tenant's backlog of deliveries to endpoints
    that never answer filled every batch, oldest first, and another tenant's delivery waited
    behind all of it."""
    from worker.webhooks import PER_TENANT

    settings = make_settings(tmp_path, kind)
    try:
        flood = add_deliveries(settings, ["https://flood.example/h"] * 30, tenant="mallory")
        [other] = add_deliveries(settings, ["https://other.example/h"], tenant="bob")
        claimed = [c.id for c in claim_due(settings, limit=20)]
        assert other in claimed
        assert {c for c in claimed if c in flood} == set(flood[:PER_TENANT])  # its oldest
    finally:
        if kind == "postgresql":
            drop_database(settings)


def test_the_sender_goes_again_at_once_while_a_tenant_had_all_its_turns():
    """With a batch capped per tenant, one tenant's burst arrives PER_TENANT rows at a time: the
    sender must not then wait its poll interval between batches, as it does when all is sent."""
    from worker.webhooks import BATCH, PER_TENANT, Claimed, more_may_be_due

    def batch(*tenants):
        return [Claimed(i, t, "e", {}, 1, 0.0, "https://x.example/h", "s")
                for i, t in enumerate(tenants)]

    assert more_may_be_due(batch(*["burst"] * PER_TENANT))
    assert more_may_be_due(batch(*["a", "b"] * (BATCH // 2)))  # a full batch
    assert not more_may_be_due(batch(*["burst"] * (PER_TENANT - 1), "b"))
    assert not more_may_be_due([])


def test_a_tenant_registers_at_most_max_webhook_endpoints(tmp_path, dns):
    settings = make_settings(tmp_path, max_webhook_endpoints=2)
    dns.answers["hooks.example.com"] = ["93.184.216.34"]
    with TestClient(create_app(settings)) as client:
        alice, bob = make_tenant(settings, "alice"), make_tenant(settings, "bob")
        url = {"url": "https://hooks.example.com/h"}
        assert [client.post("/v1/webhooks", headers=h(alice), json=url).status_code
                for _ in range(2)] == [200, 200]
        r = client.post("/v1/webhooks", headers=h(alice), json=url)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_webhook_endpoints"
        assert "max_webhook_endpoints=2" in r.json()["error"]["message"]
        assert client.post("/v1/webhooks", headers=h(bob), json=url).status_code == 200
        first = client.get("/v1/webhooks", headers=h(alice)).json()["data"][0]["id"]
        assert client.delete(f"/v1/webhooks/{first}", headers=h(alice)).status_code == 200
        assert client.post("/v1/webhooks", headers=h(alice), json=url).status_code == 200


# --- 6. At least once, and receivers can tell ----------------------------------------------------

def test_a_database_blip_while_recording_loses_no_outcome(tmp_path, monkeypatch, caplog):
    """The outcomes of a sent batch are written in one transaction; a blip there lost them all,
    and every delivered row was sent again when its lease ended. It is retried within the lease.
    The body carries the delivery's id, under the signature; the log names the host only (a
    URL's path or query may carry the receiver's token)."""
    import json
    import logging

    from sqlalchemy.exc import OperationalError

    import worker.webhooks as webhooks

    settings = make_settings(tmp_path, webhook_allow_private=True)
    real, calls = webhooks.session_scope, []

    def blip_once(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the claim is the first; the outcomes the second
            raise OperationalError("UPDATE webhook_deliveries", {}, ConnectionError("reset"))
        return real(*a, **k)

    monkeypatch.setattr(webhooks, "session_scope", blip_once)
    with receiver() as server:
        port = server.server_port
        ok, failed = add_deliveries(settings, [f"http://127.0.0.1:{port}/h",
                                               "http://127.0.0.1:9/h?token=s3cret"])
        with caplog.at_level(logging.INFO, logger="worker.webhooks"):
            assert len(send_due(settings)) == 2
    rows = delivery_rows(settings)
    assert rows[ok].delivered_at is not None and rows[ok].attempts == 1
    assert rows[failed].delivered_at is None and rows[failed].last_error
    [(_, headers, body)] = server.got
    assert json.loads(body)["id"] == f"whdel_{ok}" and headers["driftsafe-delivery"] == str(ok)
    assert "127.0.0.1" in caplog.text and "s3cret" not in caplog.text


def test_ended_deliveries_are_purged_after_a_week_and_pending_ones_never(tmp_path, monkeypatch):
    import worker.reaper as reaper

    settings = make_settings(tmp_path)
    week, now = reaper.DELIVERIES_KEPT_S, time.time()
    ids = add_deliveries(settings, ["https://x.example/h"] * 5)
    ended = {ids[0]: dict(delivered_at=now - week - 60), ids[1]: dict(delivered_at=now - 60),
             ids[2]: dict(gave_up=True, next_attempt_at=now - week - 60),
             ids[3]: dict(gave_up=True, next_attempt_at=now - 60),
             ids[4]: dict(next_attempt_at=now - week - 60)}  # still to be sent: kept
    with session_scope(settings) as s:
        for row_id, values in ended.items():
            s.query(WebhookDelivery).filter_by(id=row_id).update(values)
    monkeypatch.setattr(reaper, "_next_delivery_purge", 0.0)
    assert reaper.purge_webhook_deliveries(settings, now=now) == 2
    assert sorted(delivery_rows(settings)) == [ids[1], ids[3], ids[4]]
    # at most once an hour: the purge reads the whole table
    with session_scope(settings) as s:
        s.query(WebhookDelivery).filter_by(id=ids[1]).update({"delivered_at": now - 2 * week})
    assert reaper.purge_webhook_deliveries(settings, now=now + 60) == 0
    assert reaper.purge_webhook_deliveries(settings, now=now + 3601) == 1



def test_a_purge_the_database_refused_is_tried_again_at_the_next_pass(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import worker.reaper as reaper

    settings = make_settings(tmp_path)
    [row] = add_deliveries(settings, ["https://x.example/h"])
    with session_scope(settings) as s:
        s.query(WebhookDelivery).filter_by(id=row).update({"delivered_at": 1.0})
    monkeypatch.setattr(reaper, "_next_delivery_purge", 0.0)
    with monkeypatch.context() as m:
        def down(_settings):
            raise OperationalError("DELETE", {}, ConnectionError("down"))

        m.setattr(reaper, "session_scope", down)
        with pytest.raises(OperationalError):
            reaper.purge_webhook_deliveries(settings, now=time.time())
    assert reaper.purge_webhook_deliveries(settings, now=time.time() + 5) == 1
