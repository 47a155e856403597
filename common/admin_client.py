"""One admin command on a control socket (the scheduler's admin socket, or any service's
control socket, which answer `status`): the client side of common/protocol/admin.py."""

from __future__ import annotations

from collections.abc import Sequence

from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import RpcClient


async def admin_call(
    address: str, token: str, command: str, args: Sequence[str] = (), timeout_s: float = 10.0
) -> AdminReply:
    """Send `command` and wait for its reply. Raises the socket's RpcTimeout / RpcError
    (a dead or wrong address); a refused command is a reply with `ok` False."""
    client: RpcClient[AdminRequest, AdminReply] = RpcClient(address, AdminRequest, AdminReply)
    try:
        return await client.call(AdminRequest(token, command, list(args)), timeout_s)
    finally:
        client.close()
