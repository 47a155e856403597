"""Builds `cpu_ops.c` once per machine into the cache and loads it.

The library is compiled with the machine's C compiler (`$CC`, else `cc`) for the machine's
own instruction set (`-march=native`) into `$MEMSERVE_CACHE_DIR/kernels/cpu_ops-<digest>.so`,
the digest covering the source, the flags, the compiler's version and the CPU's feature
flags: a changed source or a cache folder shared with another kind of machine never loads
a stale or foreign build. `make install` builds it (`python -m services.worker.kernels`);
otherwise the first engine that wants it does (about a second). Processes that build at the
same time each compile into a temporary name and rename it into place: the results are
identical, the last rename wins, and nobody ever loads a half-written file.

Failure to build or load (no compiler, another architecture's toolchain) is not an error:
`load()` answers None and the engine runs its torch code (services/worker/kernels/ops.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from common.model.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared")
ABI_VERSION = 3  # memserve_abi_version() of a library this Python code can call

# MEMSERVE_KERNELS=off: never build or load (the torch code runs everywhere).
ENV_SWITCH = "MEMSERVE_KERNELS"


class BuildError(RuntimeError):
    pass


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(root: Path | None = None) -> Path:
    cc = _compiler()
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as exc:
        raise BuildError(f"no C compiler {cc!r}: {exc}") from None
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode()):
        digest.update(part)
    digest.update(_cpu_flags().encode())
    return (root or cache_dir()) / "kernels" / f"cpu_ops-{digest.hexdigest()[:16]}.so"


def build(root: Path | None = None) -> Path:
    """The library's path, compiling it first unless a build for this machine exists."""
    path = library_path(root)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [_compiler(), *FLAGS, "-o", tmp, str(SOURCE), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@cache
def load() -> ctypes.CDLL | None:
    """The kernels of this machine, or None (switched off, or they cannot be built here;
    the reason is logged once). torch must be imported first (see cpu_ops.c on OpenMP)."""
    import torch  # noqa: F401  (loads torch's libgomp before ours asks for libgomp.so.1)

    if os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "false", "no"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.memserve_abi_version() != ABI_VERSION:
            raise BuildError(f"ABI {lib.memserve_abi_version()} != {ABI_VERSION}")
    except (BuildError, OSError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable (%s): torch code runs", exc)
        return None
    return lib
