"""The shm regions the transport tests move bytes between (fixtures `src` and `dst` in
tests/mempool/conftest.py): `src` holds nonzero bytes, `dst` zeros, so a byte that
landed shows, and an untouched region is all zero."""

from __future__ import annotations

BLOCK = 64 << 10
BLOCKS = 8
WAIT_S = 30.0  # generous bound for "eventually"; never a measured threshold
