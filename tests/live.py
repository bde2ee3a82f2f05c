"""Real processes for end-to-end tests: a uvicorn API (and, later, workers) on free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from worker.embedded import wait_until_healthy

DRIFTSAFE = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTSAFE_")}
    env["DRIFTSAFE_DATA_DIR"] = str(settings.data_dir)
    env["DRIFTSAFE_SECRET_KEY"] = settings.secret_key or "test-secret"
    if settings.database_url:
        env["DRIFTSAFE_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["DRIFTSAFE_BROKER_URL"] = settings.broker_url
    if settings.models:  # registered base models: the API lists them, workers load them
        env["DRIFTSAFE_MODELS"] = json.dumps(settings.models)
    # recovery timings travel to every process, so tests can use short ones
    env["DRIFTSAFE_HEARTBEAT_SECONDS"] = str(settings.heartbeat_seconds)
    env["DRIFTSAFE_STALE_AFTER_SECONDS"] = str(settings.stale_after_seconds)
    env["DRIFTSAFE_RELAY_POLL_SECONDS"] = str(settings.relay_poll_seconds)
    env["DRIFTSAFE_LOST_MESSAGE_AFTER_SECONDS"] = str(settings.lost_message_after_seconds)
    env["DRIFTSAFE_WEBHOOK_ALLOW_PRIVATE"] = "true"  # test receivers listen on 127.0.0.1
    # limits travel too, so a test that sends many requests can lift them
    env["DRIFTSAFE_RATE_LIMIT_PER_MINUTE"] = str(settings.rate_limit_per_minute)
    env["DRIFTSAFE_MAX_RUNNING_JOBS"] = str(settings.max_running_jobs)
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(settings, *args: str) -> str:
    out = subprocess.run([*DRIFTSAFE, *args], env=env_for(settings), cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def new_tenant_key(settings, name: str) -> str:
    """`driftsafe tenants create NAME` prints the key alone on its last line."""
    return cli(settings, "tenants", "create", name).strip().splitlines()[-1]


@contextmanager
def running_api(settings, log_path: Path):
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*DRIFTSAFE, "serve", "api", "--port", str(port)],
                                env=env_for(settings), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_until_healthy(url, [proc])
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {log_path.read_text()[-2000:]}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
