"""The parent side of the engine benchmark's peers (peer_vllm.py, peer_ours.py): start a
peer process, wait for its ready line, send commands, read replies, stop it.

Never hangs: every read has a deadline, and a peer that exits (or closes its channel)
raises PeerError at once with the tail of its stderr (kept in a file, so a chatty peer can
never block on a full pipe). Both engines get the same environment knobs, recorded by
`peer_env`: OMP_NUM_THREADS and, when the library is on this machine, tcmalloc preloaded.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
STDERR_TAIL_LINES = 30
REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_SCRIPT = Path(__file__).with_name("peer_vllm.py")
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".peers" / "vllm" / "bin" / "python"


class PeerError(RuntimeError):
    """A peer failed: it died, timed out, or answered a command with an error."""


def peer_env(threads: int, tcmalloc: bool = True) -> tuple[dict[str, str], dict[str, Any]]:
    """The environment knobs applied to every peer alike, and their record for the JSON."""
    knobs: dict[str, str] = {"OMP_NUM_THREADS": str(threads)}
    preload = tcmalloc and os.path.exists(TCMALLOC)
    if preload:
        knobs["LD_PRELOAD"] = TCMALLOC
    return knobs, {"OMP_NUM_THREADS": threads, "tcmalloc": TCMALLOC if preload else None}


def vllm_argv(python: str, model_folder: str, options: Sequence[str]) -> list[str]:
    argv = [python, str(VLLM_SCRIPT), "--model", model_folder]
    for opt in options:
        argv += ["--opt", opt]
    return argv


def vllm_env() -> dict[str, str]:
    """vLLM's own knobs: the engine core in this process (so `step()` is stepped by hand),
    2 GiB of KV cache space (its CPU default would take a large part of the memory)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}


def ours_argv(
    python: str,
    model: str,
    max_seqs: int,
    max_tokens_per_seq: int,
    threads: int,
    options: Sequence[str],
) -> list[str]:
    argv = [python, "-m", "bench.engine.peer_ours", "--model", model]
    argv += ["--max-seqs", str(max_seqs), "--max-tokens-per-seq", str(max_tokens_per_seq)]
    argv += ["--threads", str(threads)]
    for opt in options:
        argv += ["--engine-opt", opt]
    return argv


def ours_env() -> dict[str, str]:
    """This checkout first on the path, so the peer runs the same code as the parent."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}


class Peer:
    """One peer process. `start` returns its ready message; `call` one command's reply;
    `close` asks it to quit, then kills it if it does not."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], drop_env: Sequence[str] = ()
    ):
        self.name = name
        self.argv = argv
        self.env = {k: v for k, v in os.environ.items() if k not in drop_env}
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._err_dir = tempfile.TemporaryDirectory(prefix=f"peer-{name}-")
        self.stderr_path = Path(self._err_dir.name) / "stderr.log"
        self._stderr: IO[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.keep_log: Path | None = None  # where close() copies the peer's stderr
        self.ready_s = float("nan")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float) -> dict[str, Any]:
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the peer
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=self.env,
                cwd=REPO_ROOT,
                bufsize=0,
            )
        except OSError as exc:
            raise PeerError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        msg = self._read(timeout_s, "ready")
        if not msg.get("ready"):
            raise PeerError(f"{self.name}: expected a ready line, got {msg}")
        self.ready_s = time.perf_counter() - t0
        self.ready = msg
        return msg

    def call(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        proc = self._proc()
        assert proc.stdin is not None
        try:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._died(f"while sending {message.get('cmd')!r}") from exc
        reply = self._read(timeout_s, repr(message.get("cmd")))
        if not reply.get("ok"):
            raise PeerError(f"{self.name}: {message.get('cmd')!r} failed: {reply.get('error')}")
        return reply

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise PeerError(f"{self.name}: not started")
        return self.proc

    def _read(self, timeout_s: float, what: str) -> dict[str, Any]:
        """One JSON line from the peer within `timeout_s`."""
        proc = self._proc()
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise PeerError(
                        f"{self.name}: no answer to {what} within {timeout_s:g} s (killed)\n"
                        + self.stderr_tail()
                    )
                if not sel.select(timeout=min(left, 1.0)):
                    if proc.poll() is not None:
                        raise self._died(f"waiting for {what}")
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    proc.wait(timeout=10)
                    raise self._died(f"waiting for {what}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeerError(f"{self.name}: not a protocol line: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise PeerError(f"{self.name}: not a protocol object: {line[:200]!r}")
        return msg

    def _died(self, when: str) -> PeerError:
        code = self._proc().poll()
        return PeerError(f"{self.name}: peer exited (code {code}) {when}\n" + self.stderr_tail())

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        if self._stderr is not None:
            self._stderr.flush()
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return f"--- {self.name} stderr: unavailable ---"
        tail = text.splitlines()[-lines:]
        return f"--- last {len(tail)} line(s) of {self.name}'s stderr ---\n" + "\n".join(tail)

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system, all threads) the peer has used so far (Linux)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # after the ")" closing the command: state is field 3, utime 14, stime 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self, timeout_s: float = 30.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self.call({"cmd": "quit"}, timeout_s)
                proc.wait(timeout=timeout_s)
            except (PeerError, subprocess.TimeoutExpired):
                self.kill()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.keep_log is not None and self.stderr_path.exists():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.stderr_path, self.keep_log)
        self._err_dir.cleanup()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_peer_python(peer: str) -> str | None:
    """Our own engine runs on this interpreter; vLLM on `make peer-vllm`'s venv if built."""
    if peer == "memserve":
        return sys.executable
    return str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else None
