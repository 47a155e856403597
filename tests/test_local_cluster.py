"""The local cluster's state file (services/cli/local_cluster.py): written 0600 and
atomically, found by `memserve admin` without flags, refused with a hint when absent,
malformed or left behind by a launcher that is gone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import local_cluster
from services.cli.admin import AdminCliError, resolve


def _state(pid: int) -> local_cluster.LocalCluster:
    return local_cluster.LocalCluster(
        pid=pid,
        gateway="tcp://127.0.0.1:5800",
        admin_address="tcp://127.0.0.1:5801",
        admin_token="state-token",
        model="tiny",
        mode="pd-caching-3",
        http="http://127.0.0.1:8000",
    )


def test_written_owner_only_and_read_back(tmp_path: Path) -> None:
    path = local_cluster.write(tmp_path / "run", _state(os.getpid()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_cluster.read(str(tmp_path / "run")) == _state(os.getpid())
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["cluster.json"]  # no temp left
    local_cluster.remove(tmp_path / "run")
    with pytest.raises(local_cluster.StateError, match="does not exist"):
        local_cluster.read(str(tmp_path / "run"))


def test_admin_finds_the_local_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSERVE_ADMIN_ADDRESS", raising=False)
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("MEMSERVE_RUN_DIR", str(tmp_path))
    local_cluster.write(tmp_path, _state(os.getpid()))
    assert resolve(None, None, None) == ("tcp://127.0.0.1:5801", "state-token")
    # Flags still win, and fill only what they name.
    assert resolve("tcp://127.0.0.1:9", None, None) == ("tcp://127.0.0.1:9", "state-token")


def test_stale_or_malformed_state_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEMSERVE_ADMIN_ADDRESS", raising=False)
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    local_cluster.write(tmp_path, _state(gone.pid))
    with pytest.raises(AdminCliError, match=r"stale: `memserve up` \(pid \d+\) is not running"):
        resolve(None, None, None, str(tmp_path))
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(local_cluster.StateError, match="malformed state file"):
        local_cluster.read(str(tmp_path))
