"""Deployment files stay in step with the code: configs load, the Procfile names real commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import build_parser
from services.mempool.__main__ import load

ROOT = Path(__file__).resolve().parents[1]


def test_mempool_config_loads() -> None:
    cfg = load(str(ROOT / "deploy" / "mempool.toml"))
    assert cfg.instance_id == "mempool-0" and cfg.transports == ["shm", "tcp"]


def test_worker_config_loads_and_matches_the_daemon() -> None:
    from services.worker.__main__ import load as load_worker

    worker = load_worker(str(ROOT / "deploy" / "worker.toml"))
    daemon = load(str(ROOT / "deploy" / "mempool.toml"))
    assert worker.mempool == daemon.control_address
    assert (worker.engine.model, worker.engine.dtype, worker.engine.block_size) == (
        daemon.model,
        daemon.dtype,
        daemon.block_size,
    )


def test_procfile_commands_parse() -> None:
    parser = build_parser()
    lines = [
        ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert lines
    for line in lines:
        _, command = line.split(":", 1)
        words = command.split()
        env = [w for w in words if "=" in w and w.startswith("MEMSERVE_")]
        argv = words[len(env) :]
        assert argv[0] == "memserve"
        args = parser.parse_args(argv[1:])
        assert callable(args.func)
        for i, word in enumerate(argv):
            if word == "--config":
                assert (ROOT / argv[i + 1]).is_file()


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    import pytest

    from common.config import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text("[mempool]\nblok_size = 16\n")
    with pytest.raises(ConfigError, match="blok_size"):
        load(str(bad))
    bad.write_text('[mempool]\nblock_size = "sixteen"\n')
    with pytest.raises(ConfigError, match="block_size"):
        load(str(bad))


def test_procfile_and_cluster_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gateway.__main__ import load as load_gateway
    from services.launcher.config import load as load_cluster
    from services.scheduler.__main__ import load as load_scheduler
    from services.worker.__main__ import load as load_worker

    shared = str(ROOT / "deploy" / "procfile.toml")
    monkeypatch.setenv("MEMSERVE_SCHEDULER__ADMIN_TOKEN", "from-the-environment")
    sched, gw = load_scheduler(shared), load_gateway(shared)
    assert gw.scheduler == sched.address and gw.scheduler_events == sched.events_address
    assert load_worker(shared).scheduler == sched.heartbeat_address
    assert load(shared).model == load_worker(shared).engine.model
    from services.api.__main__ import load as load_api

    api = load_api(shared)
    assert api.gateway == gw.address and api.model == gw.model
    cluster = load_cluster(str(ROOT / "deploy" / "local.toml"))
    assert cluster.api["enabled"] is True
    assert cluster.cluster.mode == "pd-caching-3" and cluster.cluster.roles() == [
        "prefill",
        "decode",
    ]
