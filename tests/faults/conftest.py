"""Private servers for fault injection: a Redis and a PostgreSQL of each test's own, on free ports,
that the test may kill -9, stop and restart without touching the shared ones on 6379 and 5432.

- `RedisServer`: `redis-server --save "" --appendonly no`, so a restart loses every message,
  exactly like a production Redis without persistence.
- `PostgresServer`: a cluster made once per session by initdb (trust auth, 127.0.0.1 only, its
  unix socket inside its own folder) and copied per test; `kill()` SIGKILLs the postmaster and
  every backend, a crash, and `start()` runs crash recovery on the same port.
- `FreezableProxy`: a TCP relay in front of a server; while frozen it swallows what clients send
  and answers nothing, so a client caught mid-request hangs and whatever it sent never arrives.
- `Worker` / `Api`: `driftsafe serve worker|api` processes in their own session, so a kill takes
  the Celery parent and its pool children (or uvicorn) at once.
All are stopped at the end of their fixture whatever the test did.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from glob import glob
from pathlib import Path

import pytest

from tests.live import DRIFTSAFE, ROOT, env_for, free_port

PG_BIN = Path(sorted(glob("/usr/lib/postgresql/*/bin"))[-1]) if glob(
    "/usr/lib/postgresql/*/bin") else None


def _wait(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        time.sleep(step)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    kids = []
    for stat in glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


# --- Redis -------------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.folder / "redis.log", "a")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait(lambda: self._ping() or self.proc.poll() is not None, 10, "redis did not start")
        assert self.proc.poll() is None, (self.folder / "redis.log").read_text()[-2000:]

    def _ping(self) -> bool:
        try:
            return self.client().ping()
        except Exception:  # noqa: BLE001
            return False

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """kill -9: every message it held is gone (no persistence)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


# --- PostgreSQL ---------------------------------------------------------------------------------
def _as_postgres() -> dict:
    """Run as the `postgres` user when we are root (PostgreSQL refuses to run as root)."""
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid} if os.geteuid() == 0 \
        else {}


def _owned_tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@pytest.fixture(scope="session")
def pg_template():
    """One initdb per session (a few seconds); each test copies the cluster."""
    if PG_BIN is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql")
    folder = _owned_tempdir("driftsafe-pgtemplate-")
    subprocess.run([str(PG_BIN / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U",
                    "postgres", "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                   **_as_postgres())
    yield folder / "data"
    shutil.rmtree(folder, ignore_errors=True)


class PostgresServer:
    def __init__(self, template: Path):
        self.folder = _owned_tempdir("driftsafe-pg-")
        self.data = self.folder / "data"
        subprocess.run(["cp", "-a", str(template), str(self.data)], check=True, **_as_postgres())
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(self.folder / "postgres.log", "a")
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
             # fsync off is safe here: a killed process loses nothing the kernel already has
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "dynamic_shared_memory_type=mmap"],  # no segments left in /dev/shm by a kill
            stdout=log, stderr=subprocess.STDOUT, **_as_postgres())
        log.close()
        _wait(lambda: self.ready() or self.proc.poll() is not None, 60,
              "postgres did not start")
        assert self.proc.poll() is None, self.log_tail()

    def ready(self) -> bool:
        return subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port), "-U", "postgres"]).returncode == 0

    def log_tail(self, n: int = 3000) -> str:
        return (self.folder / "postgres.log").read_text()[-n:]

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster and every backend at once."""
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        _wait(lambda: not any(_alive(p) for p in pids), 10, "postgres processes survived SIGKILL")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- a relay that can swallow traffic ------------------------------------------------------------
class FreezableProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream_port. Once frozen (by hand, or by the first chunk a
    client sends that holds `freeze_on`), bytes from either side are kept in `swallowed` and never
    delivered; the connections stay open, so a client caught mid-request hangs."""

    def __init__(self, upstream_port: int, freeze_on: bytes | None = None):
        self.upstream_port, self.freeze_on = upstream_port, freeze_on
        self.frozen = threading.Event()
        self.swallowed = bytearray()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            for a, b, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, watch), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch and self.freeze_on is not None and self.freeze_on in data:
                    self.frozen.set()
                if self.frozen.is_set():
                    self.swallowed += data
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Drop every connection for real: shut down before closing. A bare close() leaves the
        socket open while a pump thread is blocked in recv() on it, so a BRPOP the dead worker's
        consumer had sent through the proxy stayed pending at Redis, which then handed the next
        worker's message to it, to be swallowed here (the job's only message, lost)."""
        self._closed = True
        for s in [self._listener, *self._sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


# --- driftsafe processes --------------------------------------------------------------------------
class _Process:
    def __init__(self, settings, log_path: Path, args: list[str]):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*DRIFTSAFE, *args], env=env_for(settings), cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, no goodbye message."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # pool children outlive a parent that was killed alone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()


class Worker(_Process):
    def __init__(self, settings, log_path: Path, name: str = "w"):
        super().__init__(settings, log_path, ["serve", "worker", "--name", f"{name}@%h"])


class Api(_Process):
    def __init__(self, settings, log_path: Path):
        from worker.embedded import wait_until_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(settings, log_path, ["serve", "api", "--port", str(self.port)])
        try:
            wait_until_healthy(self.url, [self.proc])
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}: {log_path.read_text()[-2000:]}") from None


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def redis_server(tmp_path):
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_server(pg_template):
    server = PostgresServer(pg_template)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fault_settings(tmp_path, redis_server, pg_server):
    """Settings of a stack on the private servers, with short recovery timings."""
    from store.settings import Settings

    return Settings(data_dir=tmp_path / "data", secret_key="faults",
                    database_url=pg_server.url, broker_url=redis_server.url,
                    heartbeat_seconds=0.5, stale_after_seconds=3.0)


@pytest.fixture
def training_file(tmp_path, builtin_world) -> Path:
    """64 training lines of the built-in world: a job of a few seconds."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join((builtin_world / "train.jsonl").read_text().splitlines()[:64]) + "\n")
    return path


# --- a small service on the private servers, and the truth in its database -----------------------
STEPS_PER_EPOCH = 8  # 64 lines, batch 8


def job_body(file_id: str, epochs: int, seed: int = 1) -> dict:
    """A tiny supervised LoRA job that checkpoints (and scores 20 known facts) every epoch."""
    return dict(model="driftsafe-factlm-tiny", training_file=file_id, seed=seed,
                method={"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": epochs, "batch_size": 8, "learning_rate": 3e-3}}},
                extra_body={"evaluation": {"eval_every_n_epochs": 1, "max_known_facts": 20}})


@pytest.fixture
def service(fault_settings, training_file, tmp_path):
    """A tenant, an API on the private servers, the openai client and an uploaded training file."""
    from openai import OpenAI

    from tests.live import new_tenant_key, running_api

    key = new_tenant_key(fault_settings, "faults")
    with running_api(fault_settings, tmp_path / "api.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        with open(training_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        yield {"url": url, "key": key, "client": client, "file": file_id,
               "settings": fault_settings}


class Store:
    """Reads the job rows straight from the private database: the truth the API reports."""

    def __init__(self, settings):
        self.settings = settings

    def job(self, job_id: str):
        from store.db import session_scope
        from store.models import Job

        with session_scope(self.settings) as s:
            row = s.query(Job).filter_by(id=job_id).one()
            s.expunge(row)
            return row

    def events(self, job_id: str) -> list[str]:
        """Every event message of the job, oldest first."""
        from store.db import session_scope
        from store.models import JobEvent

        with session_scope(self.settings) as s:
            return [e.message for e in s.query(JobEvent).filter_by(job_id=job_id)
                    .order_by(JobEvent.seq)]

    def latest_checkpoint(self, job_id: str) -> int:
        from store.db import session_scope
        from worker.lifecycle import latest_checkpoint_step

        with session_scope(self.settings) as s:
            return latest_checkpoint_step(s, job_id)

    def webhooks(self, job_id: str) -> list[str]:
        """Events of the webhook deliveries made for the job."""
        from store.db import session_scope
        from store.models import WebhookDelivery

        with session_scope(self.settings) as s:
            return [d.event for d in s.query(WebhookDelivery).order_by(WebhookDelivery.id)
                    if (d.payload or {}).get("data", {}).get("id") == job_id]

    def wait_status(self, job_id: str, statuses=("succeeded", "failed", "cancelled"),
                    timeout: float = 240):
        return _wait(lambda: (j := self.job(job_id)).status in statuses and j, timeout,
                     f"job {job_id} did not reach {statuses}", step=0.3)


def finish_with_a_worker(settings, store: Store, job_id: str, log_path: Path,
                         timeout: float = 180):
    """Start a worker, wait for the job to end, stop the worker: the job's row and its events'
    messages."""
    worker = Worker(settings, log_path)
    try:
        done = store.wait_status(job_id, timeout=timeout)
    finally:
        worker.stop()
    return done, store.events(job_id)


def assert_ran_once(done, events: list[str]) -> None:
    """Succeeded, claimed once, started once, ended once."""
    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and events.count("Fine-tuning job started.") == 1, events
    assert sum("successfully completed" in m for m in events) == 1, events


def queued_messages(redis_server) -> int:
    """Wake-up messages waiting in the broker (kombu keeps a list per queue and priority)."""
    from store.queue import QUEUE

    client = redis_server.client()
    return sum(client.llen(k) for k in client.keys(QUEUE + "*") if client.type(k) == b"list")
