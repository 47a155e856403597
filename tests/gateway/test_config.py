"""The `[gateway]` table: defaults that validate, environment overrides, and errors that
name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from services.gateway.__main__ import load
from services.gateway.config import GatewayConfig, GatewaySettings


def test_defaults_are_valid_and_the_environment_overrides_one_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = GatewayConfig().validate()
    assert (cfg.max_inflight, cfg.request_timeout_s, cfg.model) == (256, 30.0, "tiny")
    path = tmp_path / "gw.toml"
    path.write_text('[gateway]\nmax_inflight = 4\nscheduler = "tcp://10.0.0.2:5800"\n')
    monkeypatch.setenv("MEMSERVE_GATEWAY__REQUEST_TIMEOUT_S", "2.5")
    cfg = load(str(path))
    assert (cfg.max_inflight, cfg.request_timeout_s) == (4, 2.5)
    assert cfg.scheduler == "tcp://10.0.0.2:5800" and cfg.max_model_len is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"max_inflight": 0}, "gateway.max_inflight"),
        ({"request_timeout_s": 0.0}, "gateway.request_timeout_s"),
        ({"place_timeout_s": -1.0}, "gateway.place_timeout_s"),
        ({"session_ttl_s": 1e9}, "gateway.session_ttl_s"),
        ({"max_model_len": 1}, "gateway.max_model_len"),
        ({"scheduler": ""}, "gateway.scheduler"),
    ],
)
def test_a_bad_value_names_its_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        GatewayConfig(**overrides).validate()  # type: ignore[arg-type]


def test_an_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_inflite"):
        load_config(GatewaySettings, None, overrides={"gateway.max_inflite": 3})
