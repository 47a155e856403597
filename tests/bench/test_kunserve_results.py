"""The KunServe evaluation's pure pieces: how each mode maps to cluster settings (equal
budget, the scheduler's elastic keys, dp-swap's worker key), the budget's and
--cluster-set's errors, the elastic timeline's per-group figures, the ratios beside the
paper's and the markdown section."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.experiment import Shape, shapes
from bench.kunserve_modes import (
    KUNSERVE_MODES,
    MIB,
    SWAP_HOST_FACTOR,
    budget_bytes,
    overrides,
    parse_cluster_set,
)
from bench.kunserve_results import (
    elastic_row,
    kunserve_figures,
    markdown,
    ratio_words,
    tpot_phase_lines,
)
from bench.timeline import bubbles, summarize_timeline

BUDGET = 6 * MIB


def tables(mode: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    (shape,) = shapes(
        [mode], ["round-robin"], prefill=1, decode=1, colocated=2, budget_bytes=BUDGET
    )
    return shape.overrides("tiny", 512, "/tmp/run", 60.0, True, extra)


def test_every_mode_has_the_same_budget_and_colocated_instances() -> None:
    for mode in KUNSERVE_MODES:
        t = tables(mode)
        assert t["mempool"]["budget_bytes"] == BUDGET, mode
        assert "device_memory_bytes" not in t["mempool"]
        assert t["cluster"]["mode"] == "colocated" and t["cluster"]["colocated"] == 2
        assert t["cluster"]["policy"] == "round-robin"


@pytest.mark.parametrize(
    ("mode", "scheduler", "worker"),
    [
        ("dp-recompute", {"elastic_auto": False}, {}),
        ("dp-swap", {"elastic_auto": False}, {}),
        ("dp-migrate", {"elastic_auto": True, "elastic_strategy": "migrate"}, {}),
        (
            "kunserve",
            {"elastic_strategy": "kunserve", "elastic_exchange": True, "elastic_restore": True},
            {},
        ),
        ("kunserve-recompute", {"elastic_exchange": False, "elastic_restore": True}, {}),
        ("kunserve-norestore", {"elastic_exchange": True, "elastic_restore": False}, {}),
    ],
)
def test_each_mode_maps_to_its_keys(
    mode: str, scheduler: dict[str, Any], worker: dict[str, Any]
) -> None:
    t = tables(mode)
    assert scheduler.items() <= t["scheduler"].items()
    assert worker.items() <= t["worker"].items()
    swap = mode == "dp-swap"
    assert t["worker"]["engine"].get("preemption_mode", "recompute") == (
        "swap" if swap else "recompute"
    )
    assert t["worker"]["engine"]["num_threads"] == 1
    assert ("host_memory_bytes" in t["mempool"]) == swap


def test_cluster_set_goes_last_table_by_table() -> None:
    extra = parse_cluster_set(
        ["scheduler.elastic_window=5", "worker.engine.num_threads=2", 'scheduler.policy="x"']
    )
    assert extra == {
        "scheduler": {"elastic_window": 5, "policy": "x"},
        "worker": {"engine": {"num_threads": 2}},
    }
    t = tables("kunserve", extra)
    assert t["scheduler"]["elastic_window"] == 5 and t["scheduler"]["elastic_auto"] is True
    assert t["worker"]["engine"] == {"num_threads": 2}
    assert t["worker"]["heartbeat_interval_s"] == 0.1
    caching = Shape("colocated").overrides("tiny", 64, "/tmp/run", 60.0, True, extra)
    assert caching["scheduler"]["elastic_window"] == 5
    assert caching["mempool"]["device_memory_bytes"] == 64 * MIB


@pytest.mark.parametrize(
    ("items", "message"),
    [(["elastic_window=5"], "SECTION.KEY=VALUE"), (["cluster.mode=x"], "unknown section")],
)
def test_a_bad_cluster_set_is_named(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluster_set(items)


def test_the_budget_must_hold_the_parameters_and_a_block() -> None:
    budget, params = budget_bytes("tiny", 6.0, 512)
    assert budget == 6 * MIB and 3 * MIB < params < 3.2 * MIB
    assert budget_bytes("tiny", None, 3)[0] == params + 3 * MIB
    with pytest.raises(ValueError, match=r"--budget-mib 2: model tiny's parameters take 3.1 MiB"):
        budget_bytes("tiny", 2, 512)


def test_dp_swap_swaps_into_a_host_tier_sized_by_the_budget() -> None:
    t = overrides(KUNSERVE_MODES["dp-swap"], 10 * MIB, param_bytes=4 * MIB)
    assert t["worker"]["engine"] == {"preemption_mode": "swap"}
    assert t["mempool"]["host_memory_bytes"] == SWAP_HOST_FACTOR * 6 * MIB
    from services.worker.config import EngineConfig

    EngineConfig(preemption_mode="swap").validate()  # the key exists and takes "swap"


def event(wall: float, name: str, gid: str = "-", **detail: Any) -> dict[str, Any]:
    return {"wall": wall, "group_id": gid, "event": name, "detail": detail}


T0 = 1000.0
EVENTS = [
    event(1003.0, "votes", voters=["colocated-0", "colocated-1"]),
    event(1003.1, "plan", groups=[["colocated-0", "colocated-1"]]),
    event(1003.1, "prepare", "g1", members=["colocated-0", "colocated-1"]),
    event(1003.6, "serving", "g1", adopted=8, freed_bytes=3 * MIB, took_s=0.5),
    event(1010.0, "restore-wanted", group="g1", used_blocks=10, held_blocks=200),
    event(1010.1, "restoring", "g1"),
    event(1010.4, "dissolved", "g1", moved=3, recomputed=1, moved_bytes=MIB, pause_s=0.05),
    event(1012.0, "prepare", "g2", members=["colocated-0", "colocated-1"]),
    event(1012.5, "serving", "g2", adopted=2, freed_bytes=3 * MIB, took_s=0.5),
]


def test_the_timeline_gives_each_groups_drop_lifetime_exchange_and_restore() -> None:
    exchange = {"g1": {"exchanged": 6, "recomputed": 1, "bytes": 2 * MIB, "stall_s_max": 0.2}}
    e = summarize_timeline(EVENTS, T0, T0 + 20.0, exchange)
    assert [x["t_s"] for x in e["timeline"]][:2] == [3.0, 3.1]
    assert e["timeline"][0]["group"] == ""  # the controller's
    g1, g2 = e["groups"]
    assert g1["group_id"] == "g1" and g1["members"] == ["colocated-0", "colocated-1"]
    assert g1["drop_s"] == pytest.approx(0.5) and g1["serving_s"] == pytest.approx(3.6)
    assert g1["restore_wanted_s"] == pytest.approx(10.0) and g1["dissolved_s"] == pytest.approx(
        10.4
    )
    assert g1["lifetime_s"] == pytest.approx(6.8) and not g1["open"]
    assert g1["restore_s"] == pytest.approx(0.3)
    assert g1["restore"] == {"moved": 3, "recomputed": 1, "moved_bytes": MIB, "pause_s": 0.05}
    assert g1["exchange"]["exchanged"] == 6 and g1["adopted"] == 8
    assert g2["open"] and g2["lifetime_s"] == pytest.approx(7.5)  # to the replay's end
    assert g2["dissolved_s"] is None and g2["restore"] == {}
    assert (e["drops"], e["restores"], e["votes"], e["migrations"]) == (2, 1, 1, 0)
    assert e["exchanged_bytes"] == 2 * MIB and e["exchanged_requests"] == 6
    assert e["drop_recomputed_requests"] == 1
    assert e["exchange_stall_s_max"] == 0.2 and e["group_s"] == pytest.approx(14.3)


def test_no_events_is_an_empty_timeline() -> None:
    e = summarize_timeline([], T0, T0 + 5)
    assert e["groups"] == [] and e["drops"] == 0 and e["exchange_stall_s_max"] is None


def run(mode: str, p99_ms: float, elastic: dict[str, Any] | None = None) -> dict[str, Any]:
    ttft = {"mean_ms": p99_ms / 2, "p50_ms": p99_ms / 3, "p99_ms": p99_ms, "p999_ms": p99_ms}
    summary = {"requests": 10, "errors": 0, "rps": 1.0, "output_tok_s": 50.0, "ttft": ttft}
    out: dict[str, Any] = {"label": mode, "mode": mode, "summary": summary}
    out["budget_bytes"] = BUDGET
    if elastic is not None:
        out["elastic"] = elastic
    return out


def test_ratios_beside_the_papers_for_the_pairs_that_ran() -> None:
    runs = [
        run("dp-recompute", 2000.0),
        run("kunserve", 100.0),
        run("kunserve-norestore", 400.0),
        run("colocated", 1.0),
    ]
    ratios = {r["name"]: r for r in kunserve_figures(runs)["ratios"]}
    assert set(ratios) == {"KunServe vs vLLM (recompute)", "restore vs none"}
    vllm = ratios["KunServe vs vLLM (recompute)"]
    assert vllm["ratio"] == pytest.approx(20.0) and vllm["paper"] == [12.7, 72.2]
    assert ratios["restore vs none"]["ratio"] == pytest.approx(4.0)
    assert ratio_words(20.0) == "20.0x lower" and ratio_words(0.25) == "4.0x higher"
    assert ratio_words(math.nan) == "n/a"


def test_the_markdown_section_has_both_tables_and_the_ratios() -> None:
    elastic = summarize_timeline(EVENTS, T0, T0 + 20.0, {"g1": {"exchanged": 6, "bytes": MIB}})
    runs = [
        run("dp-recompute", 2000.0, summarize_timeline([], T0, T0 + 20)),
        run("kunserve", 100.0, elastic),
    ]
    doc = {"name": "burst", "runs": runs, "kunserve": kunserve_figures(runs)}
    md = markdown(doc)
    assert "#### burst: KunServe modes" in md and "6.0 MiB" in md
    assert "| kunserve | 10 | 0 |" in md and "TTFT p999 ms" in md
    assert "| kunserve | 2 | 1 | 0 | 0 | 0.50 | 6.8, 7.5+ | 6 / 0 | 1.0 | 0.0 | 0.30 | 50.0 |" in md
    assert "20.0x lower (paper 12.7-72.2x lower)" in md
    assert markdown({"runs": [run("colocated", 1.0)]}) == ""


def test_tpot_in_the_group_and_after_the_restore_beside_the_baseline() -> None:
    def rec(session: str, start: float, decode_s: float, tpot_ms: float) -> dict[str, Any]:
        return {
            "session": session,
            "turn": 0,
            "sent_s": start,
            "ttft_s": 0.1,
            "jct_s": 0.1 + decode_s,
            "tpot_s": tpot_ms / 1e3,
            "error": "",
        }

    group = {"serving_s": 10.0, "dissolved_s": 30.0}
    kun = {
        "mode": "kunserve",
        "elastic": {"groups": [group]},
        "records": [
            rec("before", 0.0, 5.0, 10.0),  # decodes before the group
            rec("in", 12.0, 10.0, 30.0),  # all of it in the group
            rec("half", 25.0, 20.0, 99.0),  # mostly after it: neither
            rec("after", 40.0, 5.0, 12.0),  # starts > 5 s after the restore
        ],
    }
    base = {
        "mode": "dp-migrate",
        "records": [
            rec("before", 0.0, 5.0, 10.0),
            rec("in", 12.0, 11.0, 20.0),
            rec("half", 25.0, 20.0, 50.0),
            rec("after", 40.0, 5.0, 10.0),
        ],
    }
    (phase,) = kunserve_figures([base, kun])["tpot_phases"]
    assert phase["grouped_ms"] == pytest.approx(30.0) and phase["after_ms"] == pytest.approx(12.0)
    b = phase["baselines"]["dp-migrate"]
    assert b["grouped_ms"] == pytest.approx(20.0) and b["after_ms"] == pytest.approx(10.0)
    (line,) = tpot_phase_lines([phase])
    assert "30.0 ms vs 20.0 ms in dp-migrate (+50%)" in line and "12.0 vs 10.0 ms (+20%)" in line


def test_each_stages_bubble_is_what_it_did_not_run() -> None:
    stages = {
        "w0": {"busy_s": 6.0, "elapsed_s": 10.0},
        "w1": {"busy_s": 9.0, "elapsed_s": 10.0},
        "w2": {"busy_s": 1.0, "elapsed_s": 0.0},  # no time yet: no figure
    }
    assert bubbles(stages) == {"w0": 0.4, "w1": 0.1}
    elastic = summarize_timeline(EVENTS, T0, T0 + 20.0, {"g1": {"stages": stages}})
    assert elastic["groups"][0]["bubble"] == {"w0": 0.4, "w1": 0.1}
    row = elastic_row(run("kunserve", 100.0, elastic))
    assert row[-1].startswith("40 / 10")
