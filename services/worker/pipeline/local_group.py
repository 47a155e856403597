"""A pipeline group inside one process: the members' engines, models and KV memory side
by side, with drop and restore done by direct calls and tensor copies.

The same steps as between processes (services/worker/elastic.py), without sockets: the
reference for token identity (tests/worker/test_pipeline.py) and the in-process bench.

    members[i].engine (full model, capacity C0 full blocks of a larger region)
        drop(g):    export every request (tokens + generator, KV dropped), each member drops
                    the layers it will not hold, its region is re-viewed in sub-blocks and
                    grows by what the parameters freed (within the region), the leader's
                    PipelineEngine adopts every request (they are recomputed)
        restore():  drain, plan homes (`plan_restore`), copy each request's sub-blocks into
                    whole blocks at its home, reload the dropped layers from the checkpoint,
                    each member adopts its requests with their KV
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from common.protocol.elastic import RequestState
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput
from services.worker.kv_cache import KVCache, KVLayout
from services.worker.model.llama import LlamaModel
from services.worker.pipeline.engine import PipelineEngine
from services.worker.pipeline.exchange import GroupTables, StaleRequest, build_tables, permute
from services.worker.pipeline.homes import RestorePlan, plan_restore
from services.worker.pipeline.ring import LocalRing
from services.worker.pipeline.stage import StageServer
from services.worker.pipeline.views import kv_view, sub_layout


@dataclass
class LocalMember:
    model: LlamaModel
    raw: torch.Tensor  # the member's KV memory: 1-D uint8, a whole number of full blocks
    capacity: int  # full blocks it serves with alone (the rest is what parameters occupy)
    engine: Engine | None = None
    table: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    freed_bytes: int = 0


class LocalGroup:
    def __init__(
        self, members: list[LocalMember], layout: KVLayout, config: EngineConfig, folder: Path
    ):
        self.members = members
        self.layout = layout
        self.config = config
        self.folder = folder  # the checkpoint the dropped layers come back from
        self.leader: PipelineEngine | None = None
        self.epoch = 0
        self.last_plan: RestorePlan | None = None
        self.last_exchange: GroupTables | None = None
        self.stale_states: dict[str, RequestState] = {}
        self.views: list[KVCache] = []

    def start(self) -> None:
        """Every member serves alone on its first `capacity` full blocks."""
        for m in self.members:
            cache = kv_view(m.raw, self.layout, num_blocks=m.capacity)
            m.engine = Engine(m.model, cache, self.config)

    @property
    def g(self) -> int:
        return len(self.members)

    def drop(
        self,
        *,
        exchange: bool = True,
        shuffle: torch.Generator | None = None,
        copy: bool = True,
    ) -> PipelineEngine:
        """Form the group (ranks in member order). With `exchange` the requests running
        on the members keep their KV (each block's own layers stay in place, the others
        are copied to the members that hold them now); without it they are recomputed.
        `shuffle` permutes the group ids (tests: never mistake one for a sub-block id).
        `copy=False` leaves the exchange to the caller: the requests that keep their KV
        are in `self.stale_states`, their blocks reserved, not yet adopted (`self.copy_kv`
        moves one batch's sub-blocks)."""
        g = self.g
        layers = self.layout.num_layers
        if layers % g:
            raise ValueError(f"{g} members cannot share {layers} layers evenly")
        per = layers // g
        sub = sub_layout(self.layout, g)
        states: list[RequestState] = []
        stale: list[StaleRequest] = []
        for rank, m in enumerate(self.members):
            assert m.engine is not None
            for s in m.engine.export_requests(keep_kv=exchange):
                states.append(s)
                if s.block_ids:
                    stale.append(StaleRequest(s.request_id, rank, tuple(s.block_ids)))
            m.engine = None
        self.epoch += 1
        held: list[list[int]] = []
        for rank, m in enumerate(self.members):
            lead = rank == 0
            m.freed_bytes = m.model.drop_layers(
                range(rank * per, (rank + 1) * per), keep_embed=lead, keep_head=lead
            )
            most = m.raw.numel() // sub.bytes_per_block
            held.append(
                list(range(min(most, m.capacity * g + m.freed_bytes // sub.bytes_per_block)))
            )
        plan = build_tables(held, stale, g)
        if shuffle is not None:
            plan = permute(plan, torch.randperm(plan.num_blocks, generator=shuffle).tolist())
        self.last_exchange = plan
        views = self.views = [kv_view(m.raw, self.layout, g) for m in self.members]
        if copy:
            for move in plan.moves:  # in one process the exchange is a copy per sub-block
                self.copy_kv(move.copies)
        for m, table in zip(self.members, plan.tables, strict=True):
            m.table = torch.tensor(table, dtype=torch.long)
        stages = [
            StageServer(m.model, views[r], m.table, epoch=self.epoch, last=r == g - 1)
            for r, m in enumerate(self.members)
            if r > 0
        ]
        head = self.members[0]
        leader = self.leader = PipelineEngine(
            head.model,
            views[0],
            self.config,
            table=head.table,
            num_blocks=plan.num_blocks,
            g=g,
            ring=LocalRing(stages),
            epoch=self.epoch,
        )
        leader.reserve(sorted(plan.held()))
        moves = {mv.request_id: mv for mv in plan.moves}
        self.stale_states = {}
        for state in states:
            done = moves.get(state.request_id)
            if done is None:  # recomputed in the group
                leader.adopt(_with_kv(state, [], 0))
            elif not copy:
                self.stale_states[state.request_id] = state
            else:
                leader.unreserve(done.reserved)
                leader.adopt(_with_kv(state, done.group_blocks))
        return leader

    def copy_kv(self, copies: list[tuple[int, int, int, int]]) -> int:
        """(src member, src sub, dst member, dst sub) copies between the members' KV;
        returns the bytes copied."""
        for src_m, src, dst_m, dst in copies:
            self.views[dst_m].tensor[dst].copy_(self.views[src_m].tensor[src])
        return len(copies) * self.views[0].layout.bytes_per_block

    def restore(self) -> list[RequestOutput]:
        """Dissolve: every request goes home with its KV where there is room (else it is
        recomputed there), every member gets its full model back. Returns what the batches
        in flight produced."""
        leader = self.leader
        assert leader is not None
        g = self.g
        outputs = leader.drain()
        states = leader.export_requests(keep_kv=True)
        n = len(leader.table)  # group blocks (the pool shrank by what left with the requests)
        tables = [m.table[:n].tolist() for m in self.members]
        plan = plan_restore(
            [
                (s.request_id, s.block_ids, len(s.prompt_token_ids) + len(s.output_token_ids))
                for s in states
            ],
            tables,
            [m.capacity for m in self.members],
        )
        views = [kv_view(m.raw, self.layout, g) for m in self.members]
        for ops in plan.rounds:
            for c in ops:
                views[c.dst_member].tensor[c.dst].copy_(views[c.src_member].tensor[c.src])
        self.leader = None
        self.last_plan = plan
        for m in self.members:
            m.model.restore_layers(self.folder)
            cache = kv_view(m.raw, self.layout, num_blocks=m.capacity)
            m.engine = Engine(m.model, cache, self.config)
        for s in states:
            home = plan.homes[s.request_id]
            engine = self.members[home.member].engine
            assert engine is not None
            # No room at home: no KV, recomputed there (same tokens).
            engine.adopt(_with_kv(s, home.blocks, None if home.blocks else 0))
        return outputs


def _with_kv(state: RequestState, blocks: list[int], computed: int | None = None) -> RequestState:
    return msgspec.structs.replace(
        state,
        block_ids=blocks,
        num_computed_tokens=state.num_computed_tokens if computed is None else computed,
    )
