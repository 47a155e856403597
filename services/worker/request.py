"""A request inside the engine: its tokens, its KV blocks and where it stands.

Block ownership (the integrity check relies on it):

    block_ids = [ borrowed ... | owned ... ]
                 ^ num_borrowed_blocks

- borrowed blocks hold an already-computed prefix that someone else owns (the MemPool
  index, a transfer's receiver); they are whole, never written and never freed here;
- owned blocks came from the engine's pool (or were handed over with the request) and go
  back to it when the request ends, is aborted or preempted, unless the caller asked to keep
  them (`keep_blocks`), in which case the final output hands them over.

`num_computed_tokens` counts tokens whose K/V are in the blocks; the tokens past it are
computed by the next steps. It never exceeds `num_tokens - 1` between steps: the last known
token is always computed again to produce the next one.
"""

from __future__ import annotations

import enum
import time

import torch

from common.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"
    ERROR = "error"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        output_token_ids: list[int] | None = None,
        borrowed_block_ids: list[int] | None = None,
        owned_block_ids: list[int] | None = None,
        num_computed_tokens: int = 0,
        keep_blocks: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids = list(output_token_ids or [])
        self.token_ids = self.prompt_token_ids + self.output_token_ids
        self.params = params
        borrowed = list(borrowed_block_ids or [])
        self.block_ids = borrowed + list(owned_block_ids or [])
        self.num_borrowed_blocks = len(borrowed)
        self.num_computed_tokens = num_computed_tokens
        self.num_cached_tokens = num_computed_tokens  # reported to the client
        self.keep_blocks = keep_blocks
        self.generator = generator
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.arrival_s = time.monotonic()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def owned_block_ids(self) -> list[int]:
        return self.block_ids[self.num_borrowed_blocks :]

    @property
    def borrowed_block_ids(self) -> list[int]:
        return self.block_ids[: self.num_borrowed_blocks]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_ids)}, status={self.status.name})"
        )
