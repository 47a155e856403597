"""The KV load a worker reports in its heartbeat for the elastic controller
(services/scheduler/monitor.py), in the engine's own block units.

- `used`: blocks held by running requests (`sum(len(r.block_ids))`, the engine's view);
- `waiting`: blocks the waiting queue still needs for its remaining tokens (the engine
  scheduler's `blocks_needed`, never negative), plus whole prompts not yet admitted;
- `capacity`: what the engine may use. A solo worker: its MemPool daemon's capacity, so
  blocks the daemon keeps cached (evictable on demand) count as free, which the daemon's
  own `used` does not; a group leader: its pool of group blocks; a follower: 0 (its leader
  reports for the group).

Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class _Request(Protocol):
    @property
    def block_ids(self) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_computed_tokens(self) -> int: ...


@dataclass(frozen=True)
class KvLoad:
    used: int = 0
    waiting: int = 0
    capacity: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)


def blocks_needed(request: _Request, block_size: int) -> int:
    """Blocks `request` still needs for all its tokens (`Scheduler.blocks_needed` of its
    remaining tokens; 0 when it holds enough already)."""
    total = -(-request.num_tokens // block_size)
    return max(0, total - len(request.block_ids))


def kv_load(
    running: Iterable[_Request],
    waiting: Iterable[_Request],
    pending_tokens: Iterable[int],
    block_size: int,
    capacity: int,
) -> KvLoad:
    """The load of an engine whose scheduler runs `running` and queues `waiting`, with
    prompts of `pending_tokens` tokens not yet admitted (the async shell's inbox)."""
    used = sum(len(r.block_ids) for r in running)
    queued = sum(blocks_needed(r, block_size) for r in waiting)
    queued += sum(-(-n // block_size) for n in pending_tokens)
    return KvLoad(used, queued, max(0, capacity))
