"""The admin token check every service's control socket makes (common/protocol/admin.py).

Invariants: an empty expected token means admin is off, and then no token (the empty one
included) is accepted; the comparison takes time independent of where the tokens differ
(`hmac.compare_digest`), so a caller cannot guess the token one byte at a time.
"""

from __future__ import annotations

import hmac


def check_admin_token(given: str, expected: str) -> bool:
    """Whether `given` is the admin token `expected` (False when `expected` is empty)."""
    if not expected:
        return False
    # compare_digest on str accepts ASCII only; bytes take any token a config may hold.
    return hmac.compare_digest(given.encode(), expected.encode())
