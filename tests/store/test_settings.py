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


def _key(data_dir: str) -> str:
    return Settings(data_dir=data_dir).hmac_key().decode()


def test_processes_starting_at_once_on_a_fresh_data_dir_share_one_private_key(tmp_path):
    """`serve api --workers N` on a fresh data dir: every process makes the key if it finds
    none. Through one shared temporary name a process could read an empty key (and then reject
    every API key) or crash renaming a file another had already moved."""
    import stat

    from tests.at_once import in_processes_at_once

    for attempt in range(5):
        data_dir = tmp_path / f"fresh{attempt}"
        keys = in_processes_at_once(_key, (str(data_dir),), 8)
        assert len(set(keys)) == 1 and len(keys[0]) == 64, keys
        key_file = data_dir / "secret_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert [p.name for p in data_dir.iterdir()] == ["secret_key"]  # no temporary left
