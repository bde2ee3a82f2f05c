"""Settings that would break the service are refused at start, saying why."""

import pytest
from pydantic import ValidationError

from store.settings import Settings


def test_a_stale_limit_shorter_than_three_heartbeats_is_refused(tmp_path):
    """Beats declared stale before a live worker's next one made the reaper requeue every
    running job between two beats, each failing after three such 'losses'."""
    with pytest.raises(ValidationError, match="stale_after_seconds .* three heartbeats"):
        Settings(data_dir=tmp_path, heartbeat_seconds=150)  # the default stale limit is 120
    with pytest.raises(ValidationError, match="three heartbeats"):
        Settings(data_dir=tmp_path, heartbeat_seconds=1, stale_after_seconds=2.5)
    ok = Settings(data_dir=tmp_path, heartbeat_seconds=1, stale_after_seconds=3)
    assert (ok.heartbeat_seconds, ok.stale_after_seconds) == (1, 3)


def test_the_rule_reads_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTSAFE_HEARTBEAT_SECONDS", "60")
    with pytest.raises(ValidationError, match="three heartbeats"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("DRIFTSAFE_STALE_AFTER_SECONDS", "180")
    assert Settings(data_dir=tmp_path).stale_after_seconds == 180
