"""Embedded mode: `driftsafe up` runs the API and a worker together with no servers at all
(SQLite and the filesystem broker under the data dir, unless DRIFTSAFE_* settings say otherwise).
The worker is a child process running the same `driftsafe serve worker` as production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")]))}


def wait_until_healthy(url: str, processes, timeout_s: float = 60) -> None:
    """Poll /healthz until it answers 200; fail early if one of `processes` has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError(f"the service at {url} did not become healthy; see its logs")
        time.sleep(0.2)


@contextmanager
def embedded_service(host: str, port: int, log_dir: Path | None = None, workers: int = 1):
    """API and worker processes; yields the base URL once the API answers /healthz."""
    from store.db import migrate
    from store.settings import get_settings

    migrate(get_settings())  # once, before either process starts
    cmd = [sys.executable, "-m", "cli.main"]
    logs = []
    procs = []
    try:
        for i in range(workers):
            out = open(log_dir / f"worker{i}.log", "w") if log_dir else subprocess.DEVNULL
            logs.append(out)
            procs.append(subprocess.Popen([*cmd, "serve", "worker", "--name", f"embedded{i}@%h"],
                                          env=_env(), stdout=out, stderr=subprocess.STDOUT))
        out = open(log_dir / "api.log", "w") if log_dir else subprocess.DEVNULL
        logs.append(out)
        procs.append(subprocess.Popen([*cmd, "serve", "api", "--host", host, "--port", str(port),
                                       "--log-level", "warning"], env=_env(), stdout=out,
                                      stderr=subprocess.STDOUT))
        url = f"http://{host}:{port}"
        wait_until_healthy(url, procs)
        yield url
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            if f is not subprocess.DEVNULL:
                f.close()


def up(args) -> int:
    with embedded_service(args.host, args.port, workers=args.workers) as url:
        print(f"driftsafe is up at {url} (API docs at {url}/docs); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
