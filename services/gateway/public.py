"""How the gateway's client socket is locked: the one socket that faces non-members.

* ``client_curve = "auto"`` (default): plain on a loopback address (only local processes
  can connect, as with any local HTTP server), CURVE otherwise.
* ``"on"``: CURVE always; ``"off"``: plain always (an operator's explicit choice, e.g.
  behind a TLS-terminating proxy on a private network).

Under CURVE the gateway serves with its own key pair (``client_key_file``, made by
``memserve keys --gateway``), never the cluster key: its public key is published to
clients. ``allowed_client_keys`` (Z85 public keys) admits only those clients; empty admits
any client that knows the server key (encrypted, the gateway proven to the client).
"""

from __future__ import annotations

from common import security
from services.gateway.config import GatewayConfig

_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def is_loopback(address: str) -> bool:
    if not address.startswith("tcp://"):
        return address.startswith(("ipc://", "inproc://"))
    host = address[len("tcp://") :].rpartition(":")[0]
    return host.startswith(_LOOPBACK_HOSTS)


def client_socket_security(cfg: GatewayConfig) -> security.SocketSecurity:
    """The policy of ``cfg.address``; raises ``SecurityError`` when CURVE is due and the
    gateway has no key of its own."""
    curve = cfg.client_curve == "on" or (
        cfg.client_curve == "auto" and not is_loopback(cfg.address)
    )
    if not curve:
        return security.PLAIN
    if not cfg.client_key_file:
        raise security.SecurityError(
            f"gateway.address {cfg.address} is not loopback, so clients get CURVE: set "
            "gateway.client_key_file to a key made by `memserve keys --gateway FILE` "
            '(or gateway.client_curve = "off" to serve plain text on purpose)'
        )
    allowed = security.allowed_keys(cfg.allowed_client_keys) or None
    return security.PublicServer(security.read_key_file(cfg.client_key_file), allowed)
