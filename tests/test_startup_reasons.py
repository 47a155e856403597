"""A process that dies before reporting ready says why in the launcher's error: the last
line of its log goes with "exited without reporting ready", so a container's user sees
the reason (e.g. the api refusing a non-loopback address without an API key)."""

from __future__ import annotations

from pathlib import Path

from common.ready import StartupError
from services.launcher.config import load
from services.launcher.supervisor import Cluster


def test_the_last_line_of_a_dead_childs_log_is_in_the_error(tmp_path: Path) -> None:
    cluster = Cluster(load(None, {"cluster": {"run_dir": str(tmp_path)}}))
    reason = "ValueError: api.address http://0.0.0.0:8000 is not loopback, so requests need a key"
    (tmp_path / "api.log").write_text(f"Traceback (most recent call last):\n  ...\n{reason}\n\n")
    (tmp_path / "gateway.log").write_text("x" * 20_000 + "\n" + "y" * 1000 + "\n")
    exc = StartupError(failed={}, dead=["api", "gateway", "decode-0"], missing=[], timeout_s=None)
    cluster.explain(exc)
    message = str(exc)
    assert "api exited without reporting ready" in message
    assert f"logs in {tmp_path}\n  api: {reason}\n" in message
    assert "\n  gateway: " + "y" * 400 in message and "y" * 401 not in message  # bounded
    assert "decode-0: " not in message  # no log, nothing to add
