"""`bench speed`'s peer figure: a median step time that one stalled step does not move."""

import pytest

from bench import peers, speed


def test_a_stall_moves_a_runs_mean_rate_but_not_its_median_step():
    steady = peers.rate([0.0, 0.1, 0.2, 0.3, 0.4], batch=32)
    stalled = peers.rate([0.0, 0.1, 0.2, 0.3, 2.3], batch=32)  # one step caught a burst of load
    assert steady["step_times"] == pytest.approx([0.1] * 4)
    assert stalled["examples_per_second"] == pytest.approx(4 * 32 / 2.3)
    assert speed._median_step([stalled]) == pytest.approx(0.1)
    # pooled over every step of every repeat, not a median of per-run figures
    slow = peers.rate([0.0, 0.2, 0.4, 0.6], batch=32)
    assert speed._median_step([steady, slow, slow]) == pytest.approx(0.2)
