"""Addresses as other hosts see them."""

from __future__ import annotations


def advertise(bound: str, host: str = "") -> str:
    """The address peers should connect to for a socket bound at `bound`.

    A socket bound to a wildcard ("tcp://0.0.0.0:5600", "tcp://*:5600") cannot be connected
    to under that name: `host` (the operator's `advertise_host`) replaces the host part, and
    without it a wildcard becomes loopback (one-machine setups)."""
    if not bound.startswith("tcp://"):
        return bound
    rest = bound[len("tcp://") :]
    bound_host, _, port = rest.rpartition(":")
    if host:
        return f"tcp://{host}:{port}"
    if bound_host in ("0.0.0.0", "*", "[::]", "::"):
        return f"tcp://127.0.0.1:{port}"
    return bound
