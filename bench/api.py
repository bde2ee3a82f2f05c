"""`driftsafe bench api`: the API under load, judged the way its users' tools see it.

One run, side by side, on one fresh PostgreSQL database and a Redis database of its own:

* driftsafe as deployed: `driftsafe serve api [--workers N]` (a real uvicorn), a tenant made with
  `driftsafe tenants create`, one small training file and a page of jobs;
* a bare reference app (`bare_app` below) served by uvicorn with the same process count: FastAPI
  and SQLAlchemy doing the least a job read or creation must do on this stack - one API-key
  lookup (HMAC-SHA256 of the bearer key, one SELECT by digest) plus one row selected by id and
  tenant, or inserted.

`wrk` drives every phase at --connections for --seconds after a warm-up: job reads, job-list
reads (limit=20), job creations (each with its own Idempotency-Key), the bare app's reads and
creations, and job reads while one client streams a large JSONL upload again and again. Both apps
are up at once and every phase but the last runs --rounds times (2), the bare app's beside
driftsafe's, so that a drift of the machine's load hits both; a phase's figure is its rounds' mean
rate and p50 and their worst p99 (each round is kept in the JSON). Each phase
reports requests/s (2xx only), p50/p90/p99 latency and its errors (non-2xx by status, socket
errors, timeouts); a run with errors says so loudly and exits 3.

--driftsafe-root DIR serves another checkout (before/after comparisons): PYTHONPATH=DIR and
`python -m cli.main serve api` from DIR; --workers is passed only when N > 1, since older
checkouts do not have it. The bare app always comes from this checkout.

The bare app is sync by default (`def` routes, a SQLAlchemy Session per request from a
sessionmaker, run in FastAPI's thread pool, psycopg 3), the form driftsafe itself uses. It was the
faster of the two idiomatic forms on this stack: on 2 cores, 1 process, 32 connections it served
about 540-570 reads/s and 560 creations/s against 440-525 and 390 for `async def` routes on an
async engine (psycopg's async driver through SQLAlchemy's greenlet bridge, whose per-statement
hand-off costs more than the thread hop it saves). --bare-style async serves that form (it needs
`greenlet`, which the project does not install). The bare app runs its sync routes on the
stack's default of 40 threads; driftsafe runs its on REQUEST_THREADS (6), a tuning of its own.
--bare-threads N gives the bare app N, to see how much of a ratio that tuning is.
"""

# No `from __future__ import annotations`: FastAPI must see the bare app's dependency types, which
# are local to bare_app(), as objects rather than strings it would look up in module globals.
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "api.lua"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS = "redis://127.0.0.1:6379/{db}"
SECRET = "bench-api-secret"
MODEL = "driftsafe-factlm-tiny"
SETUP_JOBS = 25  # more than one list page, so list reads return a full page of 20
INSTALL_WRK = "wrk is not installed; install it with: apt-get install -y wrk"

# Phase name -> what the table calls it. Order is the order they run in.
PHASES = {
    "bare_reads": "bare app: job read",
    "bare_creates": "bare app: job create",
    "reads": "driftsafe: job read",
    "list_reads": "driftsafe: job list (limit=20)",
    "creates": "driftsafe: job create",
    "reads_during_upload": "driftsafe: job read + upload",
}
TARGETS = {"reads_vs_bare": 1.5, "creates_vs_bare": 1.0, "p99_ms": 100.0,
           "reads_during_upload_ratio": 0.8}


# --------------------------------------------------------------------------- the bare app

def _bare_tables():
    from sqlalchemy import JSON, BigInteger, Column, MetaData, String, Table

    md = MetaData()
    keys = Table("bare_api_keys", md, Column("digest", String(64), primary_key=True),
                 Column("tenant_id", String(64), nullable=False))
    jobs = Table("bare_jobs", md, Column("id", String(64), primary_key=True),
                 Column("tenant_id", String(64), nullable=False, index=True),
                 Column("model", String(200), nullable=False),
                 Column("training_file", String(64), nullable=False),
                 Column("status", String(32), nullable=False),
                 Column("method", JSON, nullable=False),
                 Column("seed", BigInteger, nullable=False),
                 Column("created_at", BigInteger, nullable=False))
    return md, keys, jobs


def _bare_job_object(row) -> dict:
    """The OpenAI job object's shape, as much of it as the bare row knows."""
    return {"object": "fine_tuning.job", "id": row.id, "model": row.model,
            "created_at": row.created_at, "finished_at": None, "fine_tuned_model": None,
            "organization_id": row.tenant_id, "result_files": [], "status": row.status,
            "validation_file": None, "training_file": row.training_file,
            "hyperparameters": row.method.get("hyperparameters", {}), "method": row.method,
            "trained_tokens": None, "error": None, "seed": row.seed, "metadata": None}


def _driftsafe_pool() -> dict:
    """driftsafe's default pool sizes, which the bare app takes too: a smaller pool than the
    requests in flight would have it open and close connections under load."""
    from store.settings import Settings

    fields = Settings.model_fields
    return {"pool_size": fields["db_pool_size"].default,
            "max_overflow": fields["db_max_overflow"].default}


def bare_app():
    """The bare reference app (a uvicorn factory): reads BENCH_BARE_DATABASE_URL,
    BENCH_BARE_SECRET, BENCH_BARE_STYLE (sync, the default, or async) and BENCH_BARE_THREADS
    (its request threads; unset, the stack's default)."""
    import contextlib
    from typing import Annotated

    import anyio.to_thread
    from fastapi import Depends, FastAPI, HTTPException, Request
    from pydantic import BaseModel

    url, secret = os.environ["BENCH_BARE_DATABASE_URL"], os.environ["BENCH_BARE_SECRET"].encode()
    style = os.environ.get("BENCH_BARE_STYLE", "sync")
    _, keys, jobs = _bare_tables()

    class JobCreate(BaseModel):
        model: str
        training_file: str
        method: dict | None = None
        seed: int | None = None

    def digest_of(request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise HTTPException(401, "missing API key")
        return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()

    def new_row(body: JobCreate, tenant_id: str) -> dict:
        return {"id": "ftjob-" + secrets.token_urlsafe(18), "tenant_id": tenant_id,
                "model": body.model, "training_file": body.training_file, "status": "queued",
                "method": body.method or {"type": "supervised", "supervised": {}},
                "seed": body.seed if body.seed is not None else int(time.time()) % 2**31,
                "created_at": int(time.time())}

    threads = int(os.environ.get("BENCH_BARE_THREADS") or 0)

    @contextlib.asynccontextmanager
    async def sized_threads(_app):
        if threads:  # else the stack's default (anyio's 40)
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="bare", lifespan=sized_threads)
    from sqlalchemy import insert, select

    def by_id(job_id: str, tenant_id: str):
        return select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)

    if style == "async":
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

        engine = create_async_engine(url, **_driftsafe_pool())
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        async def get_session():
            async with sessions() as session:
                yield session

        ASession = Annotated[AsyncSession, Depends(get_session)]

        async def get_tenant(request: Request, session: ASession) -> str:
            tenant_id = await session.scalar(
                select(keys.c.tenant_id).where(keys.c.digest == digest_of(request)))
            if tenant_id is None:
                raise HTTPException(401, "invalid API key")
            return tenant_id

        Tenant = Annotated[str, Depends(get_tenant)]

        @app.get("/v1/fine_tuning/jobs/{job_id}")
        async def get_job(job_id: str, session: ASession, tenant_id: Tenant):
            row = (await session.execute(by_id(job_id, tenant_id))).first()
            if row is None:
                raise HTTPException(404, "no such job")
            return _bare_job_object(row)

        @app.post("/v1/fine_tuning/jobs")
        async def create_job(body: JobCreate, session: ASession, tenant_id: Tenant):
            row = new_row(body, tenant_id)
            await session.execute(insert(jobs).values(**row))
            await session.commit()
            return _bare_job_object(_Row(row))
    else:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session, sessionmaker

        engine = create_engine(url, **_driftsafe_pool())
        sync_sessions = sessionmaker(engine, expire_on_commit=False)

        def get_sync_session():
            with sync_sessions() as session:
                yield session

        SSession = Annotated[Session, Depends(get_sync_session)]

        def get_sync_tenant(request: Request, session: SSession) -> str:
            tenant_id = session.scalar(
                select(keys.c.tenant_id).where(keys.c.digest == digest_of(request)))
            if tenant_id is None:
                raise HTTPException(401, "invalid API key")
            return tenant_id

        STenant = Annotated[str, Depends(get_sync_tenant)]

        @app.get("/v1/fine_tuning/jobs/{job_id}")
        def get_job_sync(job_id: str, session: SSession, tenant_id: STenant):
            row = session.execute(by_id(job_id, tenant_id)).first()
            if row is None:
                raise HTTPException(404, "no such job")
            return _bare_job_object(row)

        @app.post("/v1/fine_tuning/jobs")
        def create_job_sync(body: JobCreate, session: SSession, tenant_id: STenant):
            row = new_row(body, tenant_id)
            session.execute(insert(jobs).values(**row))
            session.commit()
            return _bare_job_object(_Row(row))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app


class _Row:
    def __init__(self, values: dict):
        self.__dict__.update(values)


def _bare_setup(url: str) -> tuple[str, str]:
    """Create the bare tables, one key and a page of jobs; (key in clear, a job id)."""
    from sqlalchemy import create_engine, insert

    md, keys, jobs = _bare_tables()
    engine = create_engine(url)
    key = "bare-" + secrets.token_urlsafe(32)
    tenant_id = "tenant-bare"
    job_ids = ["ftjob-" + secrets.token_urlsafe(18) for _ in range(SETUP_JOBS)]
    try:
        md.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(keys).values(
                digest=hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest(),
                tenant_id=tenant_id))
            conn.execute(insert(jobs), [
                {"id": j, "tenant_id": tenant_id, "model": MODEL, "training_file": "file-bare",
                 "status": "queued", "method": {"type": "supervised", "supervised": {}},
                 "seed": 0, "created_at": int(time.time())} for j in job_ids])
    finally:
        engine.dispose()
    return key, job_ids[0]


# --------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    """Until GET /healthz answers below 500 (an older checkout without it answers 404)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            r = httpx.get(url + "/healthz", timeout=5)
            if r.status_code < 500:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.3)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s ({last}):\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextmanager
def _server(cmd: list[str], env: dict, cwd: Path, log: Path, port: int):
    """A server in its own process group; on exit the whole group is stopped (uvicorn's worker
    processes too)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, proc, log)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the group: a stuck leader, uvicorn's worker processes
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


@contextmanager
def _fresh_database():
    import psycopg

    name = f"driftsafe_bench_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _redis_db(db: int):
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    try:
        yield REDIS.format(db=db)
    finally:
        client.flushdb()
        client.close()


def _git_commit(root: Path) -> tuple[str | None, bool]:
    def git(*args):
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return commit, dirty


# --------------------------------------------------------------------------- load

def _wrk(wrk: str, url: str, method: str, path: str, key: str, *, body: str = "",
         unique_keys: bool = False, connections: int, seconds: int, threads: int,
         timeout_s: int) -> dict:
    nonce = f"bench-{secrets.token_hex(4)}" if unique_keys else ""
    cmd = [wrk, f"-t{max(1, min(threads, connections))}", f"-c{connections}", f"-d{seconds}s",
           f"--timeout={timeout_s}s", "-s", str(WRK_SCRIPT), url,
           "--", method, path, key, body, nonce]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]}"
                           f"{out.stderr[-1500:]}")
    raw = json.loads(line[len("BENCH_JSON "):])
    seconds_run = raw["duration_us"] / 1e6
    statuses = {int(k): v for k, v in raw["statuses"].items()}
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    socket_errors = {k: v for k, v in raw["socket_errors"].items() if v}
    lat = raw["latency_us"]
    return {
        "per_s": round(ok / seconds_run, 1) if seconds_run else 0.0,
        "ok": ok, "requests": raw["requests"], "duration_s": round(seconds_run, 3),
        "p50_ms": round(lat["p50"] / 1000, 2), "p90_ms": round(lat["p90"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2), "max_ms": round(lat["max"] / 1000, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "non_2xx": sum(n for code, n in statuses.items() if not 200 <= code < 300),
        "socket_errors": socket_errors,
        "errors": sum(n for code, n in statuses.items() if not 200 <= code < 300)
                  + sum(socket_errors.values()),
    }


def _phase(name: str, opts, run) -> dict:
    if opts.warmup > 0:
        warm = run(opts.warmup)
        if warm["errors"]:
            print(f"  warm-up of {name}: {warm['errors']} errors {warm['statuses']} "
                  f"{warm['socket_errors']}", file=sys.stderr)
    result = run(opts.seconds)
    flag = f"  <-- {result['errors']} ERRORS" if result["errors"] else ""
    print(f"  {PHASES[name]:<34} {result['per_s']:>9.1f}/s  p50 {result['p50_ms']:.1f} ms  "
          f"p99 {result['p99_ms']:.1f} ms{flag}", file=sys.stderr, flush=True)
    return result


def _write_upload_file(path: Path, mb: float) -> int:
    """Valid chat-form JSONL of about `mb` megabytes, lines of ~400 bytes (well under the
    example limit); returns its size."""
    pad = "Answer with the city only, as the world records it. " * 5
    target = int(mb * 1024 * 1024)
    written, i = 0, 0
    with open(path, "w") as f:
        while written < target:
            chunk = "".join(
                '{"messages": [{"role": "system", "content": "You know the synthetic world."}, '
                f'{{"role": "user", "content": "Where was Person {n} born? {pad}"}}, '
                f'{{"role": "assistant", "content": "City{n % 997}"}}]}}\n'
                for n in range(i, i + 2000))
            i += 2000
            f.write(chunk)
            written += len(chunk)
        # On disk before any phase starts: the kernel would otherwise write these 200 MB back
        # some 30 s later, in the middle of a measured phase, and PostgreSQL's commits would
        # wait behind it.
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


class _Uploader(threading.Thread):
    """One client uploading the same large file again and again (streamed from disk), deleting
    each stored copy so neither storage quota nor disk fills."""

    def __init__(self, url: str, key: str, path: Path):
        super().__init__(daemon=True)
        self.url, self.key, self.path = url, key, path
        self.stop = threading.Event()
        self.statuses: dict[str, int] = {}
        self.completed, self.seconds, self.failures = 0, [], []

    def run(self) -> None:
        import httpx

        auth = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, timeout=600) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    with open(self.path, "rb") as f:
                        r = c.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                                   files={"file": ("big.jsonl", f, "application/jsonl")})
                except httpx.HTTPError as e:
                    self.statuses[type(e).__name__] = self.statuses.get(type(e).__name__, 0) + 1
                    self.failures.append(f"{type(e).__name__}: {e} after "
                                         f"{time.monotonic() - t0:.1f} s")
                    time.sleep(0.5)
                    continue
                self.statuses[str(r.status_code)] = self.statuses.get(str(r.status_code), 0) + 1
                if r.is_success:
                    self.completed += 1
                    self.seconds.append(time.monotonic() - t0)
                    c.delete(f"/v1/files/{r.json()['id']}", headers=auth)
                else:
                    self.failures.append(r.text[:300])
                    time.sleep(0.5)


# --------------------------------------------------------------------------- the run

def _no_job_quota(root: Path) -> str:
    """DRIFTSAFE_MAX_RUNNING_JOBS for "no limit": 0, or out of reach for older checkouts, which
    refuse 0 (and count every queued job of the backlog on every creation)."""
    probe = subprocess.run([sys.executable, "-c", "from store.settings import Settings; "
                            "Settings(secret_key='x', max_running_jobs=0)"],
                           cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                           capture_output=True, timeout=120)
    return "0" if probe.returncode == 0 else str(10**9)


def _env(root: Path, db_url: str, broker_url: str, data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTSAFE_")}
    env.update({
        "DRIFTSAFE_DATABASE_URL": db_url, "DRIFTSAFE_BROKER_URL": broker_url,
        "DRIFTSAFE_DATA_DIR": str(data_dir), "DRIFTSAFE_SECRET_KEY": SECRET,
        # limits off so they don't distort the figures: a phase queues thousands of jobs
        "DRIFTSAFE_RATE_LIMIT_PER_MINUTE": "0", "DRIFTSAFE_MAX_RUNNING_JOBS": _no_job_quota(root),
        "DRIFTSAFE_MAX_STORAGE_BYTES": str(10**15),
        "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1",
    })
    return env


def _driftsafe_setup(url: str, key: str) -> tuple[str, str]:
    """Upload a small training file and create a page of jobs; (file id, a job id)."""
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    lines = "".join(json.dumps({"question": f"Where was Person {i} born ?", "answer": f"City{i}"})
                    + "\n" for i in range(8))
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                   files={"file": ("train.jsonl", lines.encode(), "application/jsonl")})
        r.raise_for_status()
        file_id = r.json()["id"]
        job_ids = []
        for i in range(SETUP_JOBS):
            r = c.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id},
                       headers=auth | {"Idempotency-Key": f"bench-setup-{i}"})
            if not r.is_success:
                raise RuntimeError(f"creating a setup job: {r.status_code} {r.text[:500]}")
            job_ids.append(r.json()["id"])
    return file_id, job_ids[0]


def run_bench(opts) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit(INSTALL_WRK)
    root = Path(opts.driftsafe_root).resolve() if opts.driftsafe_root else ROOT
    if not (root / "cli" / "main.py").exists():
        raise SystemExit(f"{root} is not a driftsafe checkout (no cli/main.py)")
    commit, dirty = _git_commit(root)
    load = dict(connections=opts.connections, threads=opts.wrk_threads, timeout_s=opts.timeout)
    phases: dict[str, dict] = {}
    upload: dict = {}
    print(f"driftsafe bench api: {root} at {(commit or '?')[:12]}{' (dirty)' if dirty else ''}, "
          f"{opts.workers} process(es), {opts.connections} connections, {opts.seconds} s per "
          f"phase after {opts.warmup} s warm-up", file=sys.stderr, flush=True)

    with ExitStack() as stack:
        db_url = stack.enter_context(_fresh_database())
        broker_url = stack.enter_context(_redis_db(opts.redis_db))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="driftsafe-bench-api-")))
        logs = Path(opts.logs).resolve() if opts.logs else tmp
        logs.mkdir(parents=True, exist_ok=True)
        env = _env(root, db_url, broker_url, tmp / "data")

        # the bare app, same process count, same database
        bare_key, bare_job = _bare_setup(db_url)
        bare_env = env | {"BENCH_BARE_DATABASE_URL": db_url, "BENCH_BARE_SECRET": SECRET,
                          "BENCH_BARE_STYLE": opts.bare_style, "PYTHONPATH": str(ROOT),
                          "BENCH_BARE_THREADS": str(opts.bare_threads or "")}
        port = _free_port()
        cmd = [sys.executable, "-m", "uvicorn", "bench.api:bare_app", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(opts.workers)]
        bare_url = stack.enter_context(_server(cmd, bare_env, ROOT, logs / "bare.log", port))

        # driftsafe as deployed, up at the same time: its phases and the bare app's alternate
        out = subprocess.run([sys.executable, "-m", "cli.main", "tenants", "create", "bench"],
                             env=env, cwd=root, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"tenants create failed: {out.stderr[-2000:]}")
        key = out.stdout.strip().splitlines()[-1]
        big = tmp / "upload.jsonl"
        upload_bytes = _write_upload_file(big, opts.upload_mb)
        port = _free_port()
        cmd = [sys.executable, "-m", "cli.main", "serve", "api", "--host", "127.0.0.1",
               "--port", str(port)]
        if opts.workers > 1:
            cmd += ["--workers", str(opts.workers)]
        url = stack.enter_context(_server(cmd, env, root, logs / "driftsafe.log", port))
        file_id, job_id = _driftsafe_setup(url, key)
        bare_body = json.dumps({"model": MODEL, "training_file": "file-bare"})
        body = json.dumps({"model": MODEL, "training_file": file_id})
        runs = {
            "bare_reads": lambda s: _wrk(wrk, bare_url, "GET", f"/v1/fine_tuning/jobs/{bare_job}",
                                         bare_key, seconds=s, **load),
            "reads": lambda s: _wrk(wrk, url, "GET", f"/v1/fine_tuning/jobs/{job_id}", key,
                                    seconds=s, **load),
            "list_reads": lambda s: _wrk(wrk, url, "GET", "/v1/fine_tuning/jobs?limit=20", key,
                                         seconds=s, **load),
            "bare_creates": lambda s: _wrk(wrk, bare_url, "POST", "/v1/fine_tuning/jobs",
                                           bare_key, body=bare_body, unique_keys=True,
                                           seconds=s, **load),
            "creates": lambda s: _wrk(wrk, url, "POST", "/v1/fine_tuning/jobs", key, body=body,
                                      unique_keys=True, seconds=s, **load),
        }
        # Rounds of every phase, each bare phase beside driftsafe's: the load of a shared
        # machine drifts by a third over a minute, and a ratio of phases minutes apart measured
        # that drift as much as the apps.
        rounds: dict[str, list[dict]] = {name: [] for name in runs}
        for i in range(opts.rounds):
            if opts.rounds > 1:
                print(f"round {i + 1}/{opts.rounds}", file=sys.stderr, flush=True)
            for name, run in runs.items():
                rounds[name].append(_phase(name, opts, run))
        phases.update({name: _combined(results) for name, results in rounds.items()})
        # Reads while one client uploads, once, at the end (ratio to the rounds' reads)
        uploader = _Uploader(url, key, big)
        uploader.start()
        t0 = time.monotonic()
        try:
            phases["reads_during_upload"] = _phase("reads_during_upload", opts, lambda s: _wrk(
                wrk, url, "GET", f"/v1/fine_tuning/jobs/{job_id}", key, seconds=s, **load))
        finally:
            uploader.stop.set()
            done_in_phase, phase_s = uploader.completed, time.monotonic() - t0
            running_at_end = uploader.is_alive()
            uploader.join(timeout=120)  # let the upload in flight finish, for its timing
        each = uploader.seconds
        upload = {
            "file_mb": round(upload_bytes / 2**20, 1), "phase_s": round(phase_s, 1),
            "completed_in_phase": done_in_phase, "completed": uploader.completed,
            "seconds_each": [round(s, 2) for s in each],
            "mb_per_s": (round(len(each) * upload_bytes / 2**20 / sum(each), 1)
                         if each else None),
            "statuses": uploader.statuses, "failures": uploader.failures[:3],
            "in_flight_at_end": running_at_end,
        }
        result = _summary(opts, root, commit, dirty, phases, upload)
        if result["total_errors"]:
            for log in (logs / "bare.log", logs / "driftsafe.log"):
                print(f"--- {log.name}, lines other than 2xx access lines (last 40):\n"
                      + "\n".join(_unusual_lines(log)[-40:]), file=sys.stderr)
    return result


def _combined(results: list[dict]) -> dict:
    """One phase over its rounds: the mean rate and p50, the worst p90, p99 and max (a target
    on p99 holds in every round or not at all), counts summed, each round kept."""
    if len(results) == 1:
        return {**results[0], "rounds": results}
    combined = {**results[-1], "rounds": results}
    for key in ("per_s", "p50_ms"):
        combined[key] = round(statistics.fmean(r[key] for r in results), 2)
    for key in ("p90_ms", "p99_ms", "max_ms"):
        combined[key] = max(r[key] for r in results)
    for key in ("requests", "ok", "non_2xx", "errors"):
        combined[key] = sum(r[key] for r in results)
    combined["duration_s"] = round(sum(r["duration_s"] for r in results), 3)
    for key in ("statuses", "socket_errors"):  # update() keeps zero counts, as wrk's are shown
        counts = Counter()
        for r in results:
            counts.update(r[key])
        combined[key] = dict(counts)
    return combined


def _unusual_lines(log: Path) -> list[str]:
    ok = re.compile(r'^INFO: +[0-9.:]+ - "[A-Z]+ [^"]*" 2\d\d ')
    return [ln for ln in _tail(log, 10**6).splitlines() if not ok.match(ln)]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _summary(opts, root, commit, dirty, phases, upload) -> dict:
    rate = {name: p["per_s"] for name, p in phases.items()}
    result = {
        "commit": commit, "dirty": dirty, "driftsafe_root": str(root),
        "workers": opts.workers, "connections": opts.connections, "seconds": opts.seconds,
        "warmup_seconds": opts.warmup, "wrk_threads": opts.wrk_threads,
        "rounds": opts.rounds, "bare_style": opts.bare_style,
        "bare_threads": opts.bare_threads or "anyio default (40)",
        "cpus": os.cpu_count(),
        "reads_per_s": rate["reads"], "list_reads_per_s": rate["list_reads"],
        "creates_per_s": rate["creates"], "bare_reads_per_s": rate["bare_reads"],
        "bare_creates_per_s": rate["bare_creates"],
        "reads_during_upload_per_s": rate["reads_during_upload"],
        "reads_vs_bare": _ratio(rate["reads"], rate["bare_reads"]),
        "creates_vs_bare": _ratio(rate["creates"], rate["bare_creates"]),
        "reads_during_upload_ratio": _ratio(rate["reads_during_upload"], rate["reads"]),
        "p50_ms": {name: p["p50_ms"] for name, p in phases.items()},
        "p99_ms": {name: p["p99_ms"] for name, p in phases.items()},
        "errors": {name: p["errors"] for name, p in phases.items()},
        "upload": upload,
        "phases": phases,
    }
    upload_failed = sum(v for k, v in upload.get("statuses", {}).items()
                        if not k.startswith("2"))
    result["total_errors"] = sum(result["errors"].values()) + upload_failed
    driftsafe = ("reads", "list_reads", "creates", "reads_during_upload")
    result["targets"] = {
        "reads_vs_bare >= 1.5": (result["reads_vs_bare"] or 0) >= TARGETS["reads_vs_bare"],
        "creates_vs_bare >= 1.0": (result["creates_vs_bare"] or 0) >= TARGETS["creates_vs_bare"],
        "p99 < 100 ms (driftsafe phases)": all(phases[p]["p99_ms"] < TARGETS["p99_ms"]
                                               for p in driftsafe),
        "reads_during_upload_ratio >= 0.8":
            (result["reads_during_upload_ratio"] or 0) >= TARGETS["reads_during_upload_ratio"],
    }
    return result


def _table(r: dict) -> str:
    head = (f"driftsafe bench api - commit {(r['commit'] or '?')[:12]}"
            f"{' (dirty)' if r['dirty'] else ''}, {r['workers']} process(es), "
            f"{r['connections']} connections, {r['seconds']} s per phase, {r['cpus']} CPUs")
    rows = [head, "", f"{'phase':<34} {'2xx/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for name, label in PHASES.items():
        p = r["phases"][name]
        rows.append(f"{label:<34} {p['per_s']:>9.1f} {p['p50_ms']:>8.1f} {p['p99_ms']:>8.1f} "
                    f"{p['errors']:>7}" + (f"  {p['statuses']} {p['socket_errors']}"
                                           if p["errors"] else ""))
    u = r["upload"]
    rows += ["",
             f"reads vs bare app        {r['reads_vs_bare']}x   (target >= 1.5x)",
             f"creates vs bare app      {r['creates_vs_bare']}x   (target >= 1.0x)",
             f"reads during upload      {r['reads_during_upload_ratio']}x of reads without "
             f"(target >= 0.8x)",
             f"uploads                  {u.get('completed')} of {u.get('file_mb')} MB "
             f"({u.get('completed_in_phase')} finished inside the phase, one in flight at its "
             f"end: {u.get('in_flight_at_end')}), {u.get('mb_per_s')} MB/s each, "
             f"statuses {u.get('statuses')}"]
    missed = [t for t, ok in r["targets"].items() if not ok]
    rows.append("targets missed: " + ("; ".join(missed) if missed else "none"))
    return "\n".join(rows)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(args) -> int:
    if shutil.which("wrk") is None:
        print(INSTALL_WRK, file=sys.stderr)
        return 2
    # SIGTERM cleans up like Ctrl-C: servers stopped, database dropped
    signal.signal(signal.SIGTERM, _interrupt)
    result = run_bench(args)
    print(_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if result["total_errors"]:
        bar = "!" * 78
        print(f"{bar}\nTHIS RUN HAD ERRORS: {result['total_errors']} failed requests "
              f"(per phase: {result['errors']}; uploads: {result['upload'].get('statuses')}).\n"
              f"Its figures are not clean.\n{bar}", file=sys.stderr)
        return 3
    return 0

