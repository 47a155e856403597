"""How the CLI reports a failure: one line on stderr, a non-zero exit code."""

from __future__ import annotations

import sys


def fail(message: str, code: int = 1) -> int:
    print(f"memserve: error: {message}", file=sys.stderr)
    return code
