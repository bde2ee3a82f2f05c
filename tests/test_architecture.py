"""The shape of the house, checked: who imports whom, where job state and queue policy live."""

import ast
import re
from pathlib import Path

from store.queue import QUEUE, make_celery
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_worker_and_store_never_import_the_api_and_the_api_never_imports_torch():
    for package in ("worker", "store", "trainer"):
        for path in modules(package):
            assert "api" not in imported(path), path
    for path in modules("api"):
        assert "torch" not in imported(path), path


def test_job_status_strings_live_only_in_store_jobstate():
    literal = re.compile(r"""["']({})["']""".format("|".join(STATUSES)))
    for package in ("api", "worker", "store"):
        for path in modules(package):
            if path.name == "jobstate.py" or "migrations" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if literal.search(code):
                    raise AssertionError(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")


def test_celery_policy_is_stated_once():
    conf = make_celery(Settings(secret_key="x", broker_url="redis://127.0.0.1:6379/0")).conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is False
    assert conf.accept_content == ["json"]  # never unpickle a message
    for path in modules("worker") + modules("api") + modules("cli"):
        text = path.read_text()
        assert QUEUE not in text and "--concurrency=1" not in text, path
        assert "reject_on_worker_lost" not in text and "acks_late" not in text, path
