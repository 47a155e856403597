"""`memserve bench elastic` on the tiny model, one round: every figure saved, in sane
relations (no timing is judged): the drop lowers each instance's parameters and the group
holds more KV tokens than the two instances did; the restore brings the parameters back;
requests ran on both sides. The exchange and auto phases likewise (fields present, the
exchange case moved KV and the recompute case none, the timeline in order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.elastic import MEMBERS
from bench.elastic_exchange import gap_before_s, stall_s
from services.cli import build_parser

pytestmark = pytest.mark.integration


def bench(*argv: str) -> int:
    args = build_parser().parse_args(["bench", "elastic", *argv])
    return int(args.func(args))


def test_one_tiny_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "elastic.json"
    argv = ["--model", "tiny", "--kv-mib", "2", "--rounds", "1", "--requests", "1"]
    argv += [
        "--batch",
        "2",
        "--across",
        "1",
        "--max-tokens",
        "64",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert bench(*argv, "--out", str(out)) == 0
    res = json.loads(out.read_text())
    for iid in MEMBERS:
        st = res["instances"][iid]
        before, grouped, after = st["before"], st["grouped"], st["after"]
        assert grouped["worker_param_bytes"] < before["worker_param_bytes"]
        assert grouped["daemon_param_bytes"] < before["daemon_param_bytes"]
        assert after["worker_param_bytes"] == before["worker_param_bytes"]
        assert (before["split"], grouped["split"], after["split"]) == (1, 2, 1)
        assert grouped["kv_tokens"] > before["kv_tokens"]  # sub-blocks: twice as many and more
        assert before["elastic_state"] == after["elastic_state"] == "solo"
        for phase in (before, grouped, after):
            assert phase["rss_bytes"] > 0
    group = res["group"]
    assert group["kv_tokens"] > group["instances_kv_tokens_before"] > 0
    assert group["lent_bytes"] > 0
    assert [m["instance_id"] for m in group["members"]] == list(MEMBERS)
    drop = res["drop"]
    assert drop["drop_s"]["n"] == 1 and drop["ttft_from_drop_s"]["median"] > 0
    early = drop["first_token_before_group"]  # the probe raced Prepare and won, or queued
    assert early + drop["ttft_from_drop_queued_s"]["n"] == 1
    restore = res["restore"]
    assert restore["pause_s"]["n"] == 1 and restore["restore_s"]["median"] > 0
    (rnd,) = restore["rounds"]
    assert rnd["how"] == "live"  # the first round's restore is live (they alternate)
    # A request may end in the group while the live restore makes room: at most those.
    assert restore["moved"] + restore["recomputed"] <= rnd["running"]
    assert rnd["moved_live"] <= restore["moved"]
    assert restore["by_how"]["live"]["restore_s"]["n"] == 1
    for case in ("single", "batch"):
        for side in ("solo", "group"):
            assert res[case][side]["tpot_ms"]["median"] > 0
    assert set(res["single"]["group"]["instances"]) <= set(MEMBERS)
    assert "serving" in " ".join(res["events"])
    printed = capsys.readouterr().out
    assert "KV tokens: 2 instances vs group" in printed and "TPOT ms" in printed
    assert out.with_suffix(".md").read_text().startswith("| metric |")


def test_bad_rounds_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench("--rounds", "0", "--out", str(tmp_path / "x.json")) == 1
    assert "--rounds" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_exchange_phase_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One drop with exchange, one with `recompute`: the figures of both are saved; the
    exchange case moved KV between the members, the recompute case none."""
    out = tmp_path / "x.json"
    argv = ["--phases", "exchange", "--model", "tiny", "--kv-mib", "2", "--x-rounds", "1"]
    argv += ["--x-running", "2", "--x-prompt-tokens", "32", "--x-max-tokens", "160"]
    assert bench(*argv, "--run-dir", str(tmp_path / "run"), "--out", str(out)) == 0
    res = json.loads(out.read_text())
    assert res["phases"] == ["exchange"] and "drop" not in res  # the rounds did not run
    x = res["exchange"]
    assert [d["case"] for d in x["drops"]] == ["exchange", "recompute"]
    for case in ("exchange", "recompute"):
        side = x[case]
        assert side["drops"] == 1 and side["running"] >= 1
        assert side["stall_s"]["n"] >= 1 and side["stall_s"]["max"] > 0
        assert side["tpot_s"]["median"] > 0
    ex = x["exchange"]
    assert ex["exchanged"] > 0 and ex["bytes"]["median"] > 0 and ex["batches"]["median"] >= 1
    assert ex["exchanged"] + ex["recomputed"] <= x["drops"][0]["running"]
    assert x["recompute"]["exchanged"] == 0 and x["recompute"]["bytes"]["max"] == 0
    printed = capsys.readouterr().out
    assert "client stall ms, median" in printed and "KV exchanged MiB" in printed
    assert "## exchange vs recompute" in out.with_suffix(".md").read_text()


def test_auto_phase_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The controller drops and restores by itself; the timeline has its events in order
    and the client's marks; the figures between them are saved."""
    out = tmp_path / "a.json"
    argv = ["--phases", "auto", "--run-dir", str(tmp_path / "run"), "--out", str(out)]
    assert bench(*argv) == 0
    a = json.loads(out.read_text())["auto"]
    names = [e["event"] for e in a["timeline"]]
    order = ["client: burst sent", "votes", "plan", "prepare", "serving"]
    order += ["restore-wanted", "dissolved"]
    first = [names.index(n) for n in order]  # ValueError: missing
    assert first == sorted(first), names
    assert "client: first new request's first token" in names
    assert a["group_id"] and a["votes_to_serving_s"] > 0
    assert a["serving_to_first_new_token_s"] == a["serving_to_first_new_token_s"]  # not nan
    assert a["restore_wanted_to_dissolved_s"] > 0 and a["trickle_requests"] >= 1
    assert a["across_restore"]["requests"] >= 0
    printed = capsys.readouterr().out
    assert "restore-wanted -> dissolved s" in printed and "dissolved" in printed


def test_bad_phases_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench("--phases", "rounds,bogus", "--out", str(tmp_path / "x.json")) == 1
    assert "--phases" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_stall_is_the_largest_gap_around_the_drop() -> None:
    arrivals = [0.0, 0.1, 0.2, 0.9, 1.0, 1.5, 1.6]
    assert stall_s(arrivals, 0.25, 0.3) == pytest.approx(0.7)  # the gap spans the drop
    assert stall_s(arrivals, 0.95, 1.2) == pytest.approx(0.5)  # starts before it returned
    assert stall_s(arrivals, 2.0, 2.1) != stall_s(arrivals, 2.0, 2.1)  # ended before: nan
    assert gap_before_s(arrivals, 0.25) == pytest.approx(0.1)
