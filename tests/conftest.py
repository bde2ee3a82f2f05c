"""Shared fixtures. The built-in world is built once per machine (cached under the data dir)."""

import pytest


@pytest.fixture(scope="session")
def builtin_world():
    from trainer.builtin import default_world_dir

    return default_world_dir()


@pytest.fixture(scope="session")
def builtin_examples(builtin_world):
    from trainer.data import load_examples

    return {"train": load_examples(builtin_world / "train.jsonl"),
            "known": load_examples(builtin_world / "heldout_known.jsonl")}
