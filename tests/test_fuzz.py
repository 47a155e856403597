"""Every socket of a running P/D cluster fuzzed with a few hundred malformed messages each
(bench/fuzz.py, as a member would send them: past CURVE), then: every process alive, the
same greedy tokens as before, every MemPool daemon intact. The sockets that answer (RPC,
control, admin, the gateway's clients) answered with errors rather than going silent.
`memserve bench fuzz --messages 5000` is the long run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz import PEERS, fuzz_cluster, reference_tokens, settings, unharmed
from services.launcher.supervisor import Cluster

pytestmark = pytest.mark.integration


async def test_every_socket_survives_malformed_messages(tmp_path: Path) -> None:
    async with Cluster(settings("pd-basic", str(tmp_path / "run"))) as cluster:
        reference = await reference_tokens(cluster)
        sockets = await fuzz_cluster(cluster, messages=200, seed=1)
        after = await unharmed(cluster, reference)
    kinds = {name.split(".")[1] for name in sockets}
    assert kinds == set(PEERS), sockets  # every kind of endpoint was fuzzed
    for name, figures in sockets.items():
        assert figures["sent"] == 200, (name, figures)
        if PEERS[name.split(".")[1]][1]:
            assert figures["replies"] > 0, (name, figures)
    assert after["dead"] == [] and after["same_tokens"], after
    assert set(after["integrity"].values()) == {"ok"}, after
