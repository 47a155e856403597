"""The mode table (common/modes.py) and the services that read it."""

from __future__ import annotations

import pytest

from common.modes import BASE_MODES, MODES, PD_MODES, ROLES, Mode, parse_mode
from services.launcher.config import ClusterConfig


def test_table_rows() -> None:
    assert list(MODES) == [
        "colocated-nocache",
        "colocated",
        "pd-basic",
        "pd-caching-1",
        "pd-caching-2",
        "pd-caching-3",
    ]
    assert PD_MODES == ("pd-basic", "pd-caching-1", "pd-caching-2", "pd-caching-3")
    assert "colocated-nocache" not in BASE_MODES and len(BASE_MODES) == 5
    for m in MODES.values():
        assert set(m.roles) <= set(ROLES)
        # Each caching step keeps what the one before it keeps.
        assert not m.return_kv or m.decode_cache
        assert not m.decode_cache or (m.handoff_insert and m.cache)
        assert m.disaggregated or not (m.handoff_insert or m.decode_cache or m.return_kv)


@pytest.mark.parametrize("name", list(MODES))
def test_scheduler_setting_round_trip(name: str) -> None:
    m = MODES[name]
    caching = m.cache or m.disaggregated
    assert Mode.of(m.base, caching) is m
    assert m.first_role == ("prefill" if m.disaggregated else "colocated")


def test_unknown_mode_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown mode 'pd-caching-4'; choose one of .*pd-basic"):
        parse_mode("pd-caching-4")
    with pytest.raises(ValueError, match="colocated-nocache"):
        parse_mode("colocated-nocache", base_only=True)


@pytest.mark.parametrize("name", BASE_MODES)
def test_launcher_starts_the_roles_a_mode_needs(name: str) -> None:
    counts = ClusterConfig(mode=name).validate().counts()
    assert {role for role, n in counts.items() if n} == set(MODES[name].roles)
    needs_one = MODES[name].roles[-1]
    with pytest.raises(ValueError, match=f"needs cluster.{needs_one} >= 1"):
        ClusterConfig(mode=name, **{needs_one: 0}).validate()
