"""`memserve admin`: where the address and token come from (flags, then the environment,
then the [scheduler] table of --config), the instances table, and one clear line with a
non-zero exit on refusal, timeout or missing settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import RpcServer
from services.cli.admin import AdminCliError, render, resolve
from tests.scheduler.helpers import cli

CONFIG = """
[scheduler]
admin_address = "tcp://0.0.0.0:7700"
admin_token = "from-file"
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(CONFIG)
    return str(path)


def test_flags_win_over_env_which_wins_over_the_config(
    config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEMSERVE_ADMIN_ADDRESS", raising=False)
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)
    # A wildcard bind is reached over loopback.
    assert resolve(None, None, config) == ("tcp://127.0.0.1:7700", "from-file")
    monkeypatch.setenv("MEMSERVE_ADMIN_TOKEN", "from-env")
    assert resolve(None, None, config) == ("tcp://127.0.0.1:7700", "from-env")
    monkeypatch.setenv("MEMSERVE_ADMIN_ADDRESS", "tcp://127.0.0.1:7800")
    assert resolve(None, None, config) == ("tcp://127.0.0.1:7800", "from-env")
    assert resolve("tcp://127.0.0.1:7900", "flag", config) == ("tcp://127.0.0.1:7900", "flag")


def test_missing_or_unusable_settings_say_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEMSERVE_ADMIN_ADDRESS", raising=False)
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("MEMSERVE_RUN_DIR", str(tmp_path))  # no local cluster there
    with pytest.raises(AdminCliError, match="no admin address: pass --address"):
        resolve(None, "t", None)
    with pytest.raises(AdminCliError, match="no admin token: pass --token"):
        resolve("tcp://127.0.0.1:1", None, None)
    with pytest.raises(AdminCliError, match="binds a free port"):
        resolve("tcp://127.0.0.1:0", "t", None)
    with pytest.raises(AdminCliError, match="cannot read"):
        resolve(None, None, str(tmp_path / "missing.toml"))


def test_instances_print_as_a_table_and_the_rest_as_json() -> None:
    rows = [
        {
            "instance_id": "prefill-0",
            "role": "prefill",
            "state": "up",
            "charged_tokens": 120,
            "kv_used_blocks": 3,
            "kv_total_blocks": 64,
            "cached_blocks": 2,
            "last_seen_s": 0.1,
            "address": "tcp://127.0.0.1:5000",
        }
    ]
    lines = render("instances", rows).splitlines()
    assert lines[0].split()[:4] == ["INSTANCE", "ROLE", "STATE", "CHARGED"]
    assert lines[1].split()[:4] == ["prefill-0", "prefill", "up", "120"] and "3/64" in lines[1]
    assert render("instances", []) == "no instances registered"
    assert render("policy", {"policy": "locality"}) == '{\n  "policy": "locality"\n}'


async def test_refusal_and_timeout_exit_non_zero_with_one_line() -> None:
    async def refuse(req: AdminRequest) -> AdminReply:
        return AdminReply(False, error="bad admin token")

    server: RpcServer[AdminRequest, AdminReply] = RpcServer(
        "tcp://127.0.0.1:0", AdminRequest, AdminReply
    )
    serving = asyncio.create_task(server.serve(refuse))
    try:
        code, out, err = await cli(["admin", "--address", server.address, "--token", "x", "status"])
        assert code == 1 and out == ""
        assert (
            err.strip() == f"memserve: error: status refused by {server.address}: bad admin token"
        )
    finally:
        serving.cancel()
        server.close()
    code, _, err = await cli(
        ["admin", "--address", server.address, "--token", "x", "--timeout", "0.2", "status"]
    )
    assert code == 1 and "no reply from" in err and "within 0.2 s" in err
