"""`memserve bench security` runs end to end on a small budget: both locks measured, every
figure present and positive (no timing is judged here)."""

from __future__ import annotations

from bench.security import measure


async def test_a_small_run_measures_both_locks() -> None:
    out = await measure(calls=20, rounds=1, connects=4, messages=300)
    for name in ("rpc_small", "rpc_64k", "connect"):
        for lock in ("plain", "curve"):
            assert out[name][lock]["p50_us"] > 0 and out[name][lock]["n"] > 0
    assert min(out["push_msgs_per_s"].values()) > 0
