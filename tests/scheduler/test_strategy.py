"""The controller's KV-centric strategy (`elastic_strategy = "migrate"`): when instances
vote, the request placed last on the fullest voter goes to the instance with the most
free blocks (Llumnix-style), never to a voter; nothing to move or nowhere to go: a
fallback in the timeline. Pure: the core with heartbeats and placements, no sockets."""

from __future__ import annotations

import pytest

from common.protocol import scheduler as sp
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import GlobalScheduler
from services.scheduler.monitor import Drop
from tests.scheduler.helpers import heartbeat


def core_with(loads: dict[str, tuple[int, int]]) -> GlobalScheduler:
    core = GlobalScheduler(SchedulerConfig(admin_token="t", elastic_strategy="migrate").validate())
    for iid, (used, waiting) in loads.items():
        ld = sp.InstanceLoad(used_blocks=used, waiting_blocks=waiting, capacity_blocks=100)
        core.on_heartbeat(heartbeat(iid, control=f"tcp://{iid}", load=ld), 0.0)
    return core


def drop(*voters: str) -> Drop:
    return Drop(voters, dict.fromkeys(voters, 10), len(voters), len(voters))


def events(core: GlobalScheduler) -> list[str]:
    return [e["event"] for e in core.elastic.status()["events"]]


def test_the_last_request_of_the_fullest_voter_goes_to_the_emptiest_instance() -> None:
    core = core_with({"a": (99, 20), "b": (97, 20), "c": (40, 0), "d": (10, 0)})
    serving = {"r1": "a", "r2": "b", "r3": "a", "r4": "c"}
    pick = core.controller.pick_migration(drop("a", "b"), serving, 1.0)
    assert pick is not None
    assert (pick.request_id, pick.src, pick.dst) == ("r3", "a", "d")
    assert events(core)[-1] == "migrate-plan"


@pytest.mark.parametrize(
    ("loads", "serving", "why"),
    [
        ({"a": (99, 20), "b": (100, 20)}, {"r1": "a"}, "free blocks"),  # everyone votes
        ({"a": (99, 20), "b": (10, 0)}, {"r1": "b"}, "no placed request"),
    ],
)
def test_nothing_to_move_or_nowhere_to_go_falls_back(
    loads: dict[str, tuple[int, int]], serving: dict[str, str], why: str
) -> None:
    core = core_with(loads)
    voters = tuple(iid for iid, (used, _) in loads.items() if used >= 99)
    assert core.controller.pick_migration(drop(*voters), serving, 1.0) is None
    last = core.elastic.status()["events"][-1]
    assert last["event"] == "fallback" and why in last["detail"]["reason"]


def test_the_strategy_is_config_with_a_clear_refusal() -> None:
    assert SchedulerConfig().elastic_strategy == "kunserve"
    with pytest.raises(ValueError, match="kunserve|migrate|none"):
        SchedulerConfig(admin_token="t", elastic_strategy="lottery").validate()
