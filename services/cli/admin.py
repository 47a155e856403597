"""`memserve admin [--address ADDR] [--token TOKEN] [--config FILE] COMMAND [ARGS...]`:
send one admin command (common/protocol/admin.py) and print its result.

The scheduler's admin socket serves every command; `status` (and `shutdown`) also work
against a worker's, the gateway's or a MemPool daemon's control socket. The address and
token come from the flags, else MEMSERVE_ADMIN_ADDRESS / MEMSERVE_ADMIN_TOKEN, else the
`[scheduler]` table of --config (admin_address, admin_token), else the state file of the
local cluster `memserve up` started (services/cli/local_cluster.py; `--cluster RUN_DIR`
when it is not in ./.memserve/run). Exits 1 with one line on
stderr when the call is refused, fails or times out.

`elastic status` prints the pipeline groups and their timeline as tables, `elastic drop
ID,ID[,...]` the new group's id on its first line, `elastic restore GROUP|all` what was
restored; `migrate` where each placed request runs, `migrate RID INSTANCE` what the live
migration copied and its pause; `--json` prints any result as JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from common import security
from common.admin_client import admin_call
from common.cli_errors import fail
from common.net import advertise
from common.protocol.admin import COMMANDS, AdminReply, AdminRequest
from common.sockets import RpcError, RpcTimeout
from services.cli import local_cluster
from services.launcher.keys import KEY_FILE_NAME

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class AdminCliError(Exception):
    pass


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "admin",
        help="send an admin command to the scheduler (status to any service's control socket)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", default=None, help="admin / control socket (RPC) to call")
    p.add_argument("--token", default=None, help="the cluster's admin token")
    p.add_argument("--config", default=None, help="TOML file with a [scheduler] table")
    p.add_argument(
        "--cluster",
        default=None,
        help="run directory of a local `memserve up` (default: env MEMSERVE_RUN_DIR, "
        "else .memserve/run)",
    )
    p.add_argument(
        "--key-file",
        default=None,
        help="the cluster key file (else MEMSERVE_CLUSTER__KEY_FILE / __SECRET_KEY, "
        "[cluster] key_file of --config, or the key `memserve up` made in .memserve/run)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument(
        "args",
        nargs="*",
        help="drain/undrain: INSTANCE_ID; policy: [NAME]; "
        "elastic: status | drop ID,ID[,...] [recompute] | restore GROUP|all | on | off; "
        "migrate: [REQUEST_ID INSTANCE_ID]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        address, token = resolve(args.address, args.token, args.config, args.cluster)
        install_key(args.key_file, args.config, args.cluster)
        reply = asyncio.run(
            call(address, AdminRequest(token, args.command, args.args), args.timeout)
        )
    except AdminCliError as exc:
        return fail(str(exc))
    if not reply.ok:
        return fail(f"{args.command} refused by {address}: {reply.error}")
    if args.json:
        print(json.dumps(reply.result, indent=2, sort_keys=True, default=str))
    else:
        print(render(args.command, reply.result, args.args))
    return 0


def resolve(
    address: str | None, token: str | None, config: str | None, cluster: str | None = None
) -> tuple[str, str]:
    """The admin address and token: flags, then the environment, then the config file,
    then the local cluster's state file."""
    address = address or os.environ.get("MEMSERVE_ADMIN_ADDRESS") or None
    token = token or os.environ.get("MEMSERVE_ADMIN_TOKEN") or None
    if (address is None or token is None) and config:
        table = _scheduler_table(config)
        address = address or table.get("admin_address") or None
        token = token or table.get("admin_token") or None
    hint = ""
    if address is None or token is None:
        try:
            state = local_cluster.read(cluster)
            address = address or state.admin_address
            token = token or state.admin_token
        except local_cluster.StateError as exc:
            hint = f" ({exc})"
    if address is None:
        raise AdminCliError(
            "no admin address: pass --address, set MEMSERVE_ADMIN_ADDRESS, give --config "
            f"with [scheduler] admin_address, or start a local cluster{hint}"
        )
    if token is None:
        raise AdminCliError(
            "no admin token: pass --token, set MEMSERVE_ADMIN_TOKEN, give --config "
            f"with [scheduler] admin_token, or start a local cluster{hint}"
        )
    if address.startswith("tcp://") and address.rpartition(":")[2] in ("0", "*"):
        raise AdminCliError(
            f"{address} binds a free port; pass --address with the port the service bound"
        )
    return advertise(address), token


def install_key(key_file: str | None, config: str | None, cluster: str | None = None) -> None:
    """Make this process a cluster member for the call: the admin sockets are locked."""
    env = os.environ
    source = security.ClusterKeyConfig(
        key_file=key_file or env.get("MEMSERVE_CLUSTER__KEY_FILE") or None,
        secret_key=None if key_file else env.get("MEMSERVE_CLUSTER__SECRET_KEY") or None,
    )
    if source.key_file is None and source.secret_key is None:
        table = _table(config, "cluster") if config else {}
        fallback = local_cluster.run_dir(cluster) / KEY_FILE_NAME
        source.key_file = table.get("key_file") or (str(fallback) if fallback.exists() else None)
    try:
        security.install(security.load_key(source))
    except security.SecurityError as exc:
        raise AdminCliError(str(exc)) from None


def _scheduler_table(path: str) -> dict[str, Any]:
    return _table(path, "scheduler")


def _table(path: str, name: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise AdminCliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdminCliError(f"invalid TOML in {path}: {exc}") from None
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise AdminCliError(f"{path}: [{name}] is not a table")
    return table


async def call(address: str, req: AdminRequest, timeout_s: float) -> AdminReply:
    try:
        return await admin_call(address, req.token, req.command, req.args, timeout_s)
    except RpcTimeout:
        raise AdminCliError(
            f"no reply from {address} within {timeout_s:g} s (is the service running there?)"
        ) from None
    except RpcError as exc:
        raise AdminCliError(f"{address}: {exc}") from None
    except OSError as exc:
        raise AdminCliError(str(exc)) from None


_COLUMNS = (
    ("INSTANCE", "instance_id"),
    ("ROLE", "role"),
    ("STATE", "state"),
    ("CHARGED", "charged_tokens"),
    ("WAITING", "waiting"),
    ("RUNNING", "running"),
    ("KV", "kv"),
    ("CACHED", "cached_blocks"),
    ("SEEN_S", "last_seen_s"),
    ("ADDRESS", "address"),
)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _members(group: dict[str, Any]) -> str:
    """`w0(0:0-2) w1(1:2-4)`: each member (rank:first-last layers)."""
    out = []
    for m in group.get("members", []):
        layers = m.get("layers") or []
        span = f"{layers[0]}-{layers[1]}" if len(layers) == 2 else "?"
        out.append(f"{m.get('instance_id')}({m.get('rank')}:{span})")
    return " ".join(out)


def render_elastic(sub: str, result: Any) -> str:
    """`elastic status` as a groups table and a timeline, `drop` the group id first."""
    if sub == "drop" and isinstance(result, dict):
        return (
            f"{result.get('group_id')}\n"
            f"leader {result.get('leader')}, members {_members(result)}, "
            f"lent {result.get('lent_bytes', 0)} bytes, {result.get('num_blocks', 0)} group "
            f"blocks, {result.get('adopted', 0)} requests adopted"
        )
    if sub == "restore" and isinstance(result, dict):
        done = result.get("restored", [])
        if not done:
            return "nothing to restore"
        return "\n".join(
            f"restored {r['group_id']} ({' '.join(r['members'])}): moved {r['moved']}, "
            f"recomputed {r['recomputed']}, {r['moved_bytes']} bytes, pause {r['pause_s']:.3f} s"
            + (
                f"; live: {r.get('moved_live', 0)} home in {r.get('batches', 0)} batches, "
                f"longest wait {r.get('stall_max_s', 0.0):.3f} s, "
                f"{r.get('duration_s', 0.0):.3f} s in all"
                + (f" (paused for the rest: {r['fallback']})" if r.get("fallback") else "")
                if r.get("live")
                else ""
            )
            for r in done
        )
    if sub == "status" and isinstance(result, dict):
        groups = result.get("groups", [])
        lines = ["no groups"] if not groups else []
        if groups:
            rows = [
                [
                    str(g.get("group_id")),
                    str(g.get("state")),
                    str(g.get("epoch")),
                    str(g.get("leader")),
                    _members(g),
                    str(g.get("lent_bytes", 0)),
                    str(g.get("num_blocks", 0)),
                    _wall(g.get("formed_at", 0)),
                    str(g.get("reason", "")),
                ]
                for g in groups
            ]
            header = ["GROUP", "STATE", "EPOCH", "LEADER", "MEMBERS(RANK:LAYERS)"]
            header += ["LENT_BYTES", "BLOCKS", "FORMED", "REASON"]
            lines = _grid(header, rows)
        events = result.get("events", [])
        if events:
            rows = [
                [
                    _wall(e.get("wall", 0)),
                    f"{e.get('at', 0):.3f}",
                    str(e.get("group_id")),
                    str(e.get("event")),
                    json.dumps(e.get("detail", {}), sort_keys=True) if e.get("detail") else "",
                ]
                for e in events
            ]
            lines += ["", *_grid(["WALL", "MONOTONIC", "GROUP", "EVENT", "DETAIL"], rows)]
        ctl = result.get("controller")
        if isinstance(ctl, dict):
            lines += ["", *_controller(ctl)]
        return "\n".join(lines)
    return json.dumps(result, indent=2, sort_keys=True, default=str)


def render_migrate(result: dict[str, Any]) -> str:
    """`migrate` lists where each placed request runs; `migrate RID INSTANCE` what moved."""
    if "requests" in result:
        placed = result["requests"]
        if not placed:
            return "no placed requests"
        return "\n".join(_grid(["REQUEST", "INSTANCE"], [[r, i] for r, i in placed.items()]))
    return (
        f"migrated {result.get('request_id')} {result.get('src')} -> {result.get('dst')}: "
        f"{result.get('stages')} stages ({result.get('live_stages')} live), "
        f"{result.get('blocks')} blocks, {result.get('bytes')} bytes, "
        f"pause {result.get('pause_ms')} ms, total {result.get('total_ms')} ms"
    )


def _controller(ctl: dict[str, Any]) -> list[str]:
    """The automatic controller: on or off, the cooldown, and the last poll's votes."""
    poll = ctl.get("last_poll") or {}
    head = (
        f"controller {'on' if ctl.get('on') else 'off'}: "
        f"{len(poll.get('voters', []))} of {poll.get('needed', '?')} votes needed, "
        f"held {poll.get('streak', 0)} polls, cooldown {ctl.get('cooldown_left_s', 0):.1f} s"
    )
    rows = [
        [
            iid,
            "yes" if v.get("vote") else "no",
            f"{v.get('usage', 0):.2f}",
            str(v.get("waiting_blocks", 0)),
            str(v.get("free_blocks", 0)),
        ]
        for iid, v in sorted(poll.get("votes", {}).items())
    ]
    out = [head]
    if rows:
        out += _grid(["INSTANCE", "VOTE", "KV_USAGE", "WAITING_BLOCKS", "FREE_BLOCKS"], rows)
    return out


def _wall(t: float) -> str:
    if not t:
        return "-"
    ms = int((t % 1) * 1000)
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{ms:03d}"


def render(command: str, result: Any, args: list[str] | None = None) -> str:
    """`instances` and `elastic` as tables; anything else as indented JSON."""
    if command == "elastic" and args:
        return render_elastic(args[0], result)
    if command == "migrate" and isinstance(result, dict):
        return render_migrate(result)
    if command == "instances" and isinstance(result, list):
        if not result:
            return "no instances registered"
        rows = [
            [
                f"{r.get('kv_used_blocks', 0)}/{r.get('kv_total_blocks', 0)}"
                if key == "kv"
                else str(r.get(key, ""))
                for _, key in _COLUMNS
            ]
            for r in result
        ]
        return "\n".join(_grid([name for name, _ in _COLUMNS], rows))
    return json.dumps(result, indent=2, sort_keys=True, default=str)
