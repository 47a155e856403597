"""`python -m services.worker.kernels`: build this machine's CPU kernels (make install)."""

from __future__ import annotations

import sys

from services.worker.kernels.build import BuildError, build

if __name__ == "__main__":
    try:
        print(f"CPU kernels: {build()}")
    except BuildError as exc:
        print(f"CPU kernels not built ({exc}); the engine runs its torch code", file=sys.stderr)
