"""Shared fixtures. The built-in world is built once per machine (cached under the data dir)."""

import subprocess
import sys

import pytest

_builder: subprocess.Popen | None = None


def pytest_collection_finish(session):
    """On a machine without the built-in world (CI's, every run), start building it at once, in a
    process of its own, while the tests that do not need it run (the API's, the browser's): it
    takes minutes. The fixture below waits on the build's lock, or builds it itself if asked
    first; the cached result is the same either way."""
    global _builder
    if not any("builtin_world" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    from trainer.builtin import BuildConfig, world_dir_if_built

    if world_dir_if_built(BuildConfig()) is None:
        _builder = subprocess.Popen(
            [sys.executable, "-c", "from trainer.builtin import default_world_dir as d; d()"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session, exitstatus):
    if _builder is not None and _builder.poll() is None:  # a run stopped early (-x, Ctrl-C)
        _builder.terminate()
        _builder.wait(30)


@pytest.fixture(scope="session")
def builtin_world():
    from trainer.builtin import default_world_dir

    return default_world_dir()


@pytest.fixture(scope="session")
def builtin_examples(builtin_world):
    from trainer.data import load_examples

    return {"train": load_examples(builtin_world / "train.jsonl"),
            "known": load_examples(builtin_world / "heldout_known.jsonl")}
