"""An instance's memory budget (KunServe, design/kunserve-plan.md §4): one number B that
the worker's resident parameters and the daemon's KV device tier share.

    invariant M:  param_bytes + kv_capacity_blocks * block_bytes <= budget

`param_bytes` starts as the daemon's estimate from the model config and is corrected by
the worker at attach (`mp.SetParams`). Capacity only grows here: a report that would need
the KV tier to shrink is refused (`BudgetError`, kind REFUSED) and changes nothing.
Pure: no region, no pool; the daemon applies the capacity it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ErrorKind, MemServeError


class BudgetError(MemServeError):
    """A parameter report or a size that would break invariant M."""

    kind = ErrorKind.REFUSED


@dataclass
class MemoryBudget:
    budget: int  # B, bytes
    param_bytes: int  # resident parameter bytes of the instance's worker
    block_bytes: int  # one KV block of the device tier

    def __post_init__(self) -> None:
        if self.block_bytes <= 0:
            raise ValueError(f"block_bytes must be > 0, got {self.block_bytes}")
        if self.budget < 0 or self.param_bytes < 0:
            raise ValueError("budget and param_bytes must be >= 0")

    @property
    def max_blocks(self) -> int:
        """The most KV blocks the budget could ever hold (no parameters): the region's
        reservation."""
        return self.budget // self.block_bytes

    def kv_capacity_blocks(self) -> int:
        """The KV blocks that fit beside the current parameters (0 if none do)."""
        return max(0, self.budget - self.param_bytes) // self.block_bytes

    def set_params(self, nbytes: int, current_capacity_blocks: int) -> int:
        """Record `nbytes` of resident parameters and return the KV capacity to apply:
        `(budget - nbytes) // block_bytes`, never below the current capacity. Refused, with
        nothing changed, if the parameters and the current KV do not fit the budget."""
        if nbytes < 0:
            raise BudgetError(
                f"parameter bytes must be >= 0, got {nbytes}", kind=ErrorKind.BAD_REQUEST
            )
        kv_bytes = current_capacity_blocks * self.block_bytes
        if nbytes + kv_bytes > self.budget:
            raise BudgetError(
                f"{nbytes:,} parameter bytes + {kv_bytes:,} KV bytes "
                f"({current_capacity_blocks} blocks of {self.block_bytes:,}) exceed the "
                f"budget of {self.budget:,} bytes (the KV tier cannot shrink)"
            )
        self.param_bytes = nbytes
        return max(current_capacity_blocks, self.kv_capacity_blocks())

    def check(self, capacity_blocks: int) -> str:
        """Invariant M for a device tier of `capacity_blocks`: "" if it holds, else why not."""
        kv_bytes = capacity_blocks * self.block_bytes
        if self.param_bytes + kv_bytes > self.budget:
            return (
                f"budget broken: {self.param_bytes:,} parameter bytes + {kv_bytes:,} KV bytes "
                f"({capacity_blocks} blocks) > budget {self.budget:,}"
            )
        return ""
