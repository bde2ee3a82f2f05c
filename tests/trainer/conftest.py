"""Zoo fixtures: tiny models of real families, built and briefly taught once per test session."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

ZOO_TAUGHT = 12  # facts every zoo model is taught: 4 go in training (known), 8 are held out


@contextmanager
def one_thread():
    """Zoo models are tiny: a second intra-op thread only waits on the other, and on a loaded
    2-core machine that spinning made a 3 s build take 50 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """family -> directory of that family's taught tiny model (built on first use)."""
    from trainer import zoo

    built: dict[str, object] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(family: str):
        if family not in built:
            with one_thread():
                built[family] = zoo.build(family, root / family, known=zoo.facts(ZOO_TAUGHT))
        return built[family]
    return get


@pytest.fixture(scope="session")
def zoo_data():
    """Training set (4 known + 4 new facts) and held-out known facts (8) for zoo models."""
    from trainer import zoo

    taught = zoo.facts(ZOO_TAUGHT)
    return {"train": taught[:4] + zoo.facts(4, offset=200), "known": taught[4:]}
