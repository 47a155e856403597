"""Scheduler configuration: the admin token comes from config or env and is required while
the admin socket is on; the admin socket stays on loopback unless allowed; bad values
name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from services.scheduler.__main__ import load
from services.scheduler.config import SchedulerConfig, SchedulerSettings, is_loopback


def test_token_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[scheduler]\nmode = "pd-caching-2"\npolicy = "session"\n')
    monkeypatch.setenv("MEMSERVE_SCHEDULER__ADMIN_TOKEN", "0123")
    cfg = load(str(path))
    assert (cfg.mode, cfg.policy, cfg.admin_token) == ("pd-caching-2", "session", "0123")


def test_admin_socket_needs_a_token_and_loopback() -> None:
    with pytest.raises(ValueError, match="scheduler.admin_token is required"):
        SchedulerConfig().validate()
    assert SchedulerConfig(admin_address="").validate().admin_token == ""  # admin off
    remote = SchedulerConfig(admin_address="tcp://0.0.0.0:7000", admin_token="t")
    with pytest.raises(ValueError, match="scheduler.admin_allow_remote"):
        remote.validate()
    SchedulerConfig(
        admin_address="tcp://0.0.0.0:7000", admin_token="t", admin_allow_remote=True
    ).validate()
    assert is_loopback("tcp://127.0.0.1:0") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://10.0.0.1:5")


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"mode": "pd-magic"}, "scheduler.mode"),
        ({"policy": "fastest"}, "scheduler.policy"),
        ({"heartbeat_timeout_s": 0.0}, "scheduler.heartbeat_timeout_s"),
        ({"cache_threshold": 2.0}, "scheduler.cache_threshold"),
        ({"min_fetch_tokens": -1}, "scheduler.min_fetch_tokens"),
    ],
)
def test_bad_values_name_their_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SchedulerConfig(admin_token="t", **values).validate()  # type: ignore[arg-type]


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[scheduler]\npolicyy = 'locality'\n")
    with pytest.raises(ConfigError, match="scheduler.policyy: unknown key"):
        load_config(SchedulerSettings, str(path))
