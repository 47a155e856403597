"""An instance's memory budget (KunServe, design/kunserve-plan.md §4): one number B that
the worker's resident parameters and the daemon's KV device tier share.

    invariant M:  param_bytes + kv_capacity_blocks * (block_bytes / split) <= budget

Capacity is counted in the device tier's current units: whole blocks, or in split mode
(KunServe, `set_split(g)`) sub-blocks of `block_bytes / g` bytes each.

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
    block_bytes: int  # one whole KV block of the device tier (all layers)
    split: int = 1  # sub-blocks per whole block; capacities are counted in sub-blocks

    def __post_init__(self) -> None:
        if self.block_bytes <= 0:
            raise ValueError(f"block_bytes must be > 0, got {self.block_bytes}")
        if self.budget < 0 or self.param_bytes < 0:
            raise ValueError("budget and param_bytes must be >= 0")

    @property
    def unit_bytes(self) -> int:
        """Bytes of one unit of capacity: a block, or a sub-block in split mode."""
        return self.block_bytes // self.split

    def set_split(self, g: int) -> None:
        """Count capacity in units of `block_bytes / g` (g = 1: whole blocks again)."""
        if g < 1 or self.block_bytes % g:
            raise ValueError(f"{self.block_bytes}-byte blocks do not split into {g} parts")
        self.split = g

    @property
    def max_blocks(self) -> int:
        """The most KV units the budget could ever hold (no parameters). Unsplit: the
        region's reservation."""
        return self.budget // self.unit_bytes

    def kv_capacity_blocks(self) -> int:
        """The KV units that fit beside the current parameters (0 if none do)."""
        return max(0, self.budget - self.param_bytes) // self.unit_bytes

    def set_params(self, nbytes: int, current_capacity_blocks: int) -> int:
        """Record `nbytes` of resident parameters and return the KV capacity to apply:
        `(budget - nbytes) // unit_bytes`, never below the current capacity. Refused, with
        nothing changed, if the parameters and the current KV do not fit the budget."""
        if nbytes < 0:
            raise BudgetError(
                f"parameter bytes must be >= 0, got {nbytes}", kind=ErrorKind.BAD_REQUEST
            )
        kv_bytes = current_capacity_blocks * self.unit_bytes
        if nbytes + kv_bytes > self.budget:
            raise BudgetError(
                f"{nbytes:,} parameter bytes + {kv_bytes:,} KV bytes "
                f"({current_capacity_blocks} blocks of {self.unit_bytes:,}) exceed the "
                f"budget of {self.budget:,} bytes (the KV tier cannot shrink)"
            )
        self.param_bytes = nbytes
        return max(current_capacity_blocks, self.kv_capacity_blocks())

    def check(self, capacity_blocks: int) -> str:
        """Invariant M for a device tier of `capacity_blocks` (current units): "" if it
        holds, else why not."""
        kv_bytes = capacity_blocks * self.unit_bytes
        if self.param_bytes + kv_bytes > self.budget:
            return (
                f"budget broken: {self.param_bytes:,} parameter bytes + {kv_bytes:,} KV bytes "
                f"({capacity_blocks} blocks of {self.unit_bytes:,}) > budget {self.budget:,}"
            )
        return ""
