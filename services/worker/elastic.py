"""A worker's part in KunServe pipeline groups: the elastic control messages
(common/protocol/elastic.py) on its control socket.

    solo ──Prepare──▶ prepared ──Commit──▶ leader (rank 0) | follower (rank > 0)
      ▲                  │ Abort / timeout                     │ Restore (leader) /
      └──────────────────┘                                     │ Dissolve (follower) / Break
      └────────────────────────────────────────────────────────┘

- prepared: the engine is paused between steps (requests keep queueing), the stage PULL
  is bound; nothing is irreversible yet.
- commit: every request leaves the engine (tokens + generator state; its KV is dropped and
  recomputed in the group), the lease goes back, the layers this rank does not hold are
  dropped (on followers the embedding, norm and head too), the daemon splits its blocks
  into sub-blocks and grows KV into the freed memory, and the worker leases all of it.
  A follower then serves its layer range on the ring; the leader runs a `PipelineEngine`
  and adopts every member's requests, streaming them on from where they were.
- restore (leader): live (services/worker/live_restore.py), requests go home in batches
  to rank 1 (the *home*, which took its parameters back beside its stage) while the group
  keeps serving; then, for whatever is left, the pause restore: drain the ring, plan each
  request's home (`plan_restore`), move the KV into whole blocks at the homes (MemPool
  transfers between daemons, local copies within one), then every member gives back the
  rest, shrinks, merges, reloads its layers from the checkpoint on local disk and adopts
  its requests with their KV (the home keeps its engine and merges under it).
- break (a member died): the leader fails the group's requests; every survivor restores
  from local disk (never from a peer) and serves alone.

Invariant: outside `solo` the worker serves no request of its own; a follower forwards the
requests and aborts that reach it to the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgspec
import torch

from common.auth import check_admin_token
from common.logging import get_logger
from common.model.presets import resolve_model
from common.net import advertise
from common.protocol import elastic as el
from common.protocol.stage import StageMessage
from common.sockets import PullSocket, PushSocket, RpcClient
from services.worker.block_pool import BlockPool
from services.worker.engine import Engine
from services.worker.kv_cache import KVLayout
from services.worker.live_restore import HOME, LiveRestore
from services.worker.mempool_engine import MempoolEngine
from services.worker.pipeline.engine import PipelineEngine
from services.worker.pipeline.exchange import StaleRequest, build_tables
from services.worker.pipeline.exchanger import Exchanger
from services.worker.pipeline.homes import plan_restore
from services.worker.pipeline.moves import homes_of, lease_all, move_home
from services.worker.pipeline.socket_ring import SocketRing, serve_stage
from services.worker.pipeline.stage import StageServer
from services.worker.pipeline.views import copy_sub_blocks, kv_view


class MemberHost(Protocol):
    """What a group member needs of its worker (services/worker/service.py)."""

    cfg: Any  # WorkerConfig: instance_id, admin_token, advertise_host, stage_*
    engine: MempoolEngine
    routes: dict[str, str]  # request id -> reply_to, for every request it streams
    aborted: dict[str, float]  # request id -> when an abort for it arrived (recent ones)

    @property
    def healthy(self) -> bool: ...

    def adopt(self, state: el.RequestState) -> None: ...

    def fail_moved(self, state: el.RequestState, error: str) -> None: ...

    def announce(self, state: el.RequestState, instance_id: str, address: str) -> None: ...

    def forward_abort(self, request_id: str, address: str) -> None: ...


log = get_logger(__name__)

_PEER_RPC_TIMEOUT_S = 30.0


class ElasticError(RuntimeError):
    pass


class ElasticMember:
    def __init__(self, service: MemberHost):
        self.svc = service
        self.state = "solo"
        self.group_id = ""
        self.epoch = 0
        self.rank = -1
        self.members: list[el.Member] = []
        self.followers: list[el.FollowerCommitted] = []
        self.held: list[int] = []  # every sub-block this member holds in the group
        self.tables: list[list[int]] = []  # the leader's: each member's, by rank
        self.exchanger: Exchanger | None = None
        self.exchange_task: asyncio.Task[None] | None = None
        self.capacity_blocks = 0  # full blocks before the drop: what the restore gives back
        self.stage_pull: PullSocket[StageMessage] | None = None
        self.stage_push: PushSocket[StageMessage] | None = None
        self.stage_task: asyncio.Task[None] | None = None
        self.timer: asyncio.Task[None] | None = None
        # A follower forwards from its commit's export on: its engine stays paused until
        # the group dissolves, so a request queued there would wait that long.
        self.forwarding = False
        self.exported: list[el.RequestState] = []  # a follower's requests, sent to its leader
        # After a restore (leader): request id -> the request address of the member it
        # went home to; the gateway aborts here until that member has spoken.
        self.moved: dict[str, str] = {}
        # A live restore's home (rank 1): its solo engine on whole blocks [0, home_blocks)
        # beside the stage it still serves, and the blocks a HomeTake reserved there.
        self.home: Engine | None = None
        self.home_blocks = 0
        self.home_reserved: set[int] = set()
        self.home_pending: dict[str, el.RequestState] = {}  # HomeTake'n, not yet adopted
        self.stage_table: list[int] = []  # a follower's sub-block of each group block
        self.stage_server: StageServer | None = None
        self.full_param_bytes = 0  # the whole model's, before the drop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self._lock = asyncio.Lock()  # one control message at a time

    # ------------------------------------------------------------------ state
    @property
    def g(self) -> int:
        return len(self.members)

    @property
    def forward_to(self) -> str:
        """Where a follower sends the requests that reach it ("" = serve them here)."""
        if (self.state == "follower" or self.forwarding) and self.members:
            return self.members[0].address
        return ""

    def abort_to(self, request_id: str) -> str:
        """Where an abort for `request_id` goes ("" = here)."""
        if self.home is not None and request_id in self.svc.routes:
            return ""  # at home here, or being adopted here (a live restore)
        return self.forward_to or self.moved.get(request_id, "")

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "group": self.group_id,
            "rank": self.rank,
            "members": [m.instance_id for m in self.members],
            "sub_blocks": len(self.held),
            "exchange": self.exchanger.stats.to_dict() if self.exchanger else {},
            "stage": self._stage_busy(),
        }

    def _stage_busy(self) -> dict[str, float]:
        """This member's stage: batches, busy and elapsed seconds (bubble = the rest)."""
        if self.state == "leader" and isinstance(self.svc.engine.engine, PipelineEngine):
            return self.svc.engine.engine.busy()
        if self.state == "follower" and self.stage_server is not None:
            return self.stage_server.busy()
        return {}

    # ---------------------------------------------------------------- dispatch
    async def handle(self, req: el.ElasticRequest) -> el.ElasticReply:
        if not check_admin_token(req.token, self.svc.cfg.admin_token):
            return el.Refused("bad admin token")
        async with self._lock:
            try:
                match req:
                    case el.Prepare():
                        return await self._prepare(req)
                    case el.Abort():
                        return await self._abort(req)
                    case el.Commit():
                        return await self._commit(req)
                    case el.StageTable():
                        return await self._stage_table(req)
                    case el.Restore():
                        return await self._restore(req)
                    case el.CopyLocal():
                        return self._copy_local(req)
                    case el.HomeOpen():
                        return await self._home_open(req)
                    case el.HomeTake():
                        return await self._home_take(req)
                    case el.HomeAdopt():
                        return await self._home_adopt(req)
                    case el.Dissolve():
                        return await self._dissolve(req)
                    case el.Break():
                        return await self._break(req)
            except ElasticError as exc:
                return el.Refused(str(exc))
            except Exception as exc:
                log.error(
                    "elastic step failed", message=type(req).__name__, error=str(exc), exc_info=True
                )
                return el.Refused(
                    f"{type(req).__name__} failed on {self.svc.cfg.instance_id}: {exc}"
                )
        return el.Refused(f"unknown elastic message {type(req).__name__}")

    def _same_group(self, group_id: str, epoch: int, *states: str) -> None:
        if self.state not in states:
            raise ElasticError(
                f"{self.svc.cfg.instance_id} is {self.state}"
                + (f" in group {self.group_id}" if self.group_id else "")
                + f", not {' or '.join(states)}"
            )
        if (group_id, epoch) != (self.group_id, self.epoch):
            raise ElasticError(
                f"{self.svc.cfg.instance_id} is in group {self.group_id} epoch {self.epoch}, "
                f"not {group_id} epoch {epoch}"
            )

    # ----------------------------------------------------------------- prepare
    async def _prepare(self, req: el.Prepare) -> el.ElasticReply:
        svc = self.svc
        if self.state != "solo":
            raise ElasticError(
                f"{svc.cfg.instance_id} is already {self.state} in group {self.group_id}"
            )
        if not svc.healthy:
            raise ElasticError(f"{svc.cfg.instance_id} is not healthy")
        ranks = sorted(m.rank for m in req.members)
        mine = [m for m in req.members if m.instance_id == svc.cfg.instance_id]
        if ranks != list(range(len(req.members))) or len(mine) != 1 or len(ranks) < 2:
            raise ElasticError("a group needs ranks 0..g-1, g >= 2, this worker among them once")
        engine = svc.engine.engine
        layers = engine.model_config.num_layers
        if layers % len(req.members):
            raise ElasticError(f"{len(req.members)} members cannot share {layers} layers evenly")
        info = await svc.engine.client.info()
        if info.split != 1:
            raise ElasticError(f"its daemon is already split ({info.split})")
        self.moved = {}  # a new group: requests may move again (no abort may loop)
        await svc.engine.pause()
        try:
            self.stage_pull = PullSocket(svc.cfg.stage_address, StageMessage, bind=True)
        except BaseException:
            svc.engine.resume()
            raise
        self.state = "prepared"
        self.group_id, self.epoch = req.group_id, req.epoch
        self.members = sorted(req.members, key=lambda m: m.rank)
        self.rank = mine[0].rank
        self.timer = asyncio.create_task(self._expire(req.group_id, req.epoch, req.timeout_s))
        log.info("prepared for a group", group=req.group_id, rank=self.rank)
        return el.Ready(
            instance_id=svc.cfg.instance_id,
            model=engine.config.model,
            num_layers=layers,
            param_bytes=engine.model.param_bytes(),
            budget_bytes=info.budget_bytes,
            block_bytes=engine.cache.layout.bytes_per_block,
            stage=advertise(self.stage_pull.address, svc.cfg.advertise_host),
        )

    async def _expire(self, group_id: str, epoch: int, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        async with self._lock:
            if self.state == "prepared" and (self.group_id, self.epoch) == (group_id, epoch):
                log.warning("no commit in time: the group is off", group=group_id)
                self._leave_prepared()

    def _leave_prepared(self) -> None:
        self._close_stage()
        self._reset()
        self.svc.engine.resume()

    async def _abort(self, req: el.Abort) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "prepared")
        if self.timer is not None:
            self.timer.cancel()
        self._leave_prepared()
        return el.Done(self.svc.cfg.instance_id)

    # ------------------------------------------------------------------ commit
    async def _commit(self, req: el.Commit) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "prepared")
        if self.timer is not None:
            self.timer.cancel()
        self.members = sorted(req.members, key=lambda m: m.rank)
        if any(not m.stage for m in self.members):
            raise ElasticError("every member needs its stage address (from Ready)")
        if self.rank == 0 and len(req.followers) != self.g - 1:
            raise ElasticError(
                f"the leader needs {self.g - 1} follower commits, got {len(req.followers)}"
            )
        self.forwarding = self.rank > 0
        try:
            states, freed = await self._drop(req.exchange)
        except Exception as exc:  # the followers' requests came to be adopted here
            for s in (s for f in req.followers for s in f.requests):
                self.svc.fail_moved(s, f"group {self.group_id} did not form: {exc}")
            raise
        svc = self.svc
        model = svc.engine.engine.model
        if self.rank > 0:
            # The leader serves them from now on: if it dies, the gateway must fail them
            # (and a group that breaks fails them here: `_break`).
            leader = self.members[0]
            for state in states:
                svc.announce(state, leader.instance_id, leader.address)
            self.exported = states
            self.state = "follower"  # serves its layers once the leader sends its table
            log.info("dropped as a follower", group=self.group_id, rank=self.rank, freed=freed)
            return el.FollowerCommitted(
                instance_id=svc.cfg.instance_id,
                requests=states,
                num_blocks=len(self.held),
                param_bytes=model.param_bytes(),
                freed_bytes=freed,
                table=self.held,
                capacity_blocks=self.capacity_blocks,
            )
        return await self._lead(req, states, freed)

    async def _lead(
        self, req: el.Commit, own: list[el.RequestState], freed: int
    ) -> el.GroupServing:
        """The leader's commit: build the group's tables (every member's held sub-blocks
        and running requests), hand each follower its table, start the pipeline engine,
        adopt every request, and exchange the KV of those that keep it."""
        svc = self.svc
        names = [m.instance_id for m in self.members]
        self.followers = sorted(req.followers, key=lambda f: names.index(f.instance_id))
        by_rank = [own] + [f.requests for f in self.followers]
        stale = [
            StaleRequest(s.request_id, rank, tuple(s.block_ids))
            for rank, states in enumerate(by_rank)
            for s in states
            if s.block_ids
        ]
        plan = build_tables([self.held] + [f.table for f in self.followers], stale, self.g)
        self.tables = plan.tables
        await asyncio.gather(
            *(
                self.ask(m, el.StageTable(svc.cfg.admin_token, self.group_id, self.epoch, t))
                for m, t in zip(self.members[1:], plan.tables[1:], strict=True)
            )
        )
        self.state = "leader"
        model = svc.engine.engine.model
        inner = svc.engine.engine
        self.stage_push = PushSocket(self.members[1].stage, StageMessage, bind=False)
        assert self.stage_pull is not None
        ring = SocketRing(asyncio.get_running_loop(), self.stage_push, self.stage_pull)
        pipeline = PipelineEngine(
            model,
            kv_view(svc.engine.region.tensor(), self._full_layout, self.g),
            inner.config,
            table=torch.tensor(plan.tables[0], dtype=torch.long),
            num_blocks=plan.num_blocks,
            g=self.g,
            ring=ring,
            epoch=self.epoch,
            stage_timeout_s=svc.cfg.stage_timeout_s,
        )
        pipeline.reserve(sorted(plan.held()))
        svc.engine.engine = pipeline
        states = {s.request_id: s for ss in by_rank for s in ss}
        moving = {mv.request_id for mv in plan.moves}
        for rid, state in states.items():
            if rid not in moving:  # recomputed in the group
                svc.adopt(msgspec.structs.replace(state, block_ids=[], num_computed_tokens=0))
        self.exchanger = Exchanger(
            plan.moves,
            states,
            self.members,
            join=svc.adopt,
            between_steps=svc.engine.call_between_steps,
            unreserve=pipeline.unreserve,
            stepped=svc.engine.stepped,
            sub_bytes=pipeline.cache.layout.bytes_per_block,
            timeout_s=svc.cfg.transfer_timeout_s,
        )
        self.exchange_task = asyncio.create_task(self.exchanger.run())
        svc.engine.resume()
        log.info(
            "leading a group",
            group=self.group_id,
            blocks=plan.num_blocks,
            adopted=len(states),
            exchanging=len(plan.moves),
        )
        return el.GroupServing(
            group_id=self.group_id,
            num_blocks=plan.num_blocks,
            block_size=inner.block_size,
            adopted=len(states),
            param_bytes=model.param_bytes(),
            freed_bytes=freed,
            exchanging=len(plan.moves),
        )

    async def _stage_table(self, req: el.StageTable) -> el.ElasticReply:
        """A follower's table from its leader: serve its layer range on the ring."""
        self._same_group(req.group_id, req.epoch, "follower")
        if self.stage_task is not None:
            raise ElasticError("this stage is already serving")
        model = self.svc.engine.engine.model
        self.stage_table = list(req.table)
        stage = self.stage_server = StageServer(
            model,
            kv_view(self.svc.engine.region.tensor(), self._full_layout, self.g),
            torch.tensor(req.table, dtype=torch.long),
            epoch=self.epoch,
            last=self.rank == self.g - 1,
            # Fixed: a live restore brings the other layers back while this stage serves.
            layers=range(model.first_layer, model.last_layer),
        )
        nxt = self.members[(self.rank + 1) % self.g]
        self.stage_push = PushSocket(nxt.stage, StageMessage, bind=False)
        assert self.stage_pull is not None
        self.stage_task = asyncio.create_task(
            serve_stage(stage, self.stage_pull, self.stage_push, self.executor)
        )
        log.info("serving as a stage", group=self.group_id, rank=self.rank)
        return el.Done(self.svc.cfg.instance_id)

    async def _drop(self, exchange: bool) -> tuple[list[el.RequestState], int]:
        """Export the requests (with `exchange`, each keeps its full blocks here: they
        stay leased), give the rest of the lease back, drop the layers this rank does not
        hold, split the daemon's blocks and lease every sub-block. Returns the exported
        requests and the parameter bytes freed; `self.held` lists every sub-block held."""
        svc = self.svc
        eng = svc.engine
        inner = eng.engine
        states = []
        for s, _ in await eng.export(keep_kv=exchange):
            if s.request_id not in svc.routes:  # nowhere to stream it: let it go
                if s.block_ids:
                    await eng.client.free_mem(s.block_ids)
                continue
            states.append(msgspec.structs.replace(s, reply_to=svc.routes[s.request_id]))
        try:
            spare = inner.pool.take_free(inner.pool.num_free)
            if spare:
                await eng.client.free_mem(spare)
            info = await eng.client.info()
            self.capacity_blocks = info.device_blocks
            self.full_param_bytes = _resident(eng, inner.model)
            per = inner.model_config.num_layers // self.g
            lead = self.rank == 0
            freed = inner.model.drop_layers(
                range(self.rank * per, (self.rank + 1) * per), keep_embed=lead, keep_head=lead
            )
            try:
                if eng.arena is not None:  # GPU: the kept parameters move up, the gap is KV's
                    eng.arena.compact(inner.model)
                await eng.client.set_params(_resident(eng, inner.model))
                split = await eng.client.split(self.g, grow=True)
            except Exception:
                # Not split: the commit fails and `Abort` resumes this member alone, so it
                # must hold its whole model again (from local disk, as at a restore).
                await self._reload(inner.model, inner.config)
                raise
        except Exception as exc:
            # Their streams ended as moved and nobody will adopt them: end them now, and
            # give back the KV they kept (whole blocks: the daemon is not split).
            kept_blocks = [b for s in states for b in s.block_ids]
            if kept_blocks:
                with contextlib.suppress(Exception):
                    await eng.client.free_mem(kept_blocks)
            for s in states:
                svc.fail_moved(s, f"group {self.group_id} did not form: {exc}")
            raise
        if eng.arena is not None:
            eng.arena.set_kv_bytes(split.capacity_blocks * split.block_bytes)
        g = self.g
        kept = [b * g + j for s in states for b in s.block_ids for j in range(g)]
        leased = await lease_all(eng.client, eng.owner, split.capacity_blocks - len(kept))
        self.held = sorted(kept + leased)
        eng.grouped = True
        eng.group_lease = list(self.held)
        return states, freed

    @property
    def _full_layout(self) -> KVLayout:
        cfg = self.svc.engine.engine.model_config
        eng = self.svc.engine.engine
        return KVLayout.for_model(cfg, eng.block_size, eng.cache.layout.dtype)

    # ----------------------------------------------------------------- restore
    async def _restore(self, req: el.Restore) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "leader")
        svc = self.svc
        eng = svc.engine
        pipeline = eng.engine
        assert isinstance(pipeline, PipelineEngine)
        if self.exchange_task is not None:  # requests still exchanging join the group first
            await self.exchange_task
        t_start = time.monotonic()
        live = None
        if req.live:
            live = LiveRestore(self, pipeline, deadline=t_start + req.live_timeout_s)
            await live.run()
        t0 = time.monotonic()
        leftover = live.leftover if live is not None else []
        try:
            await eng.pause()
            loop = asyncio.get_running_loop()
            for out in await loop.run_in_executor(eng._executor, pipeline.drain):
                await eng._deliver(out)
            if live is not None:  # parked while the drain brought their batches back
                await live.hand_over(pipeline.take_parked())
            states = [
                msgspec.structs.replace(s, reply_to=svc.routes.get(s.request_id, s.reply_to))
                for s, _ in await eng.export(keep_kv=True)
            ] + leftover
        except Exception as exc:  # left the engine on their way home: end them now
            for s in leftover:
                svc.fail_moved(s, f"restore of group {self.group_id} failed: {exc}")
            raise
        n = len(pipeline.table)  # group blocks (the pool shrank by what left with the requests)
        tables = [t[:n] for t in self.tables]
        caps = [self.capacity_blocks] + [f.capacity_blocks for f in self.followers]
        if live is not None and live.opened:
            caps[HOME] = 0  # its whole blocks serve the requests already home
        try:
            plan = plan_restore(
                [
                    (s.request_id, s.block_ids, len(s.prompt_token_ids) + len(s.output_token_ids))
                    for s in states
                ],
                tables,
                caps,
            )
            moved_bytes = await move_home(plan, self.members, pipeline.cache, self._copy_at)
        except Exception as exc:
            # Exported (their streams ended as moved) and no member has them yet: end them
            # with an error now (the group breaks next) rather than leave them silent.
            for s in states:
                svc.fail_moved(s, f"restore of group {self.group_id} failed: {exc}")
            raise
        homes = homes_of(states, plan)
        for rank, moving in homes.items():  # a home that dies now must fail them
            for state in moving:
                home = self.members[rank]
                svc.announce(state, home.instance_id, home.address)
        followers = self.members[1:]
        replies = await asyncio.gather(
            *(
                self.ask(
                    m,
                    el.Dissolve(
                        svc.cfg.admin_token,
                        self.group_id,
                        self.epoch,
                        plan.keep(m.rank),
                        homes[m.rank],
                    ),
                )
                for m in followers
            ),
            return_exceptions=True,
        )
        for m, r in zip(followers, replies, strict=True):
            if isinstance(r, ElasticError):  # refused: it adopted none of its requests
                for s in homes[m.rank]:
                    svc.fail_moved(s, f"restore of group {self.group_id} failed: {r}")
        moved_live = dict(self.moved)  # requests a live restore sent home
        home_id = self.members[HOME].instance_id  # (the members are forgotten below)
        try:
            await self._dissolve_local(plan.keep(0), homes[0])
        except Exception as exc:  # it fails before it adopts any of them
            for s in homes[0]:
                svc.fail_moved(s, f"restore of group {self.group_id} failed: {exc}")
            raise
        self.moved = moved_live | {
            s.request_id: m.address
            for m, r in zip(followers, replies, strict=True)
            if not isinstance(r, BaseException)
            for s in homes[m.rank]
        }
        for rid, address in self.moved.items():
            if rid in svc.aborted:  # the abort came while it was moving home
                svc.forward_abort(rid, address)
        failed = [str(r) for r in replies if isinstance(r, BaseException)]
        if failed:
            raise ElasticError(f"restore: a member did not dissolve: {'; '.join(failed)}")
        done = time.monotonic()
        stats = live.stats if live is not None else None
        return el.Restored(
            group_id=req.group_id,
            moved=plan.moved + (stats.moved if stats else 0),
            recomputed=plan.recomputed,
            moved_bytes=moved_bytes + (stats.moved_bytes if stats else 0),
            pause_s=done - t0,
            live=live is not None,
            moved_live=stats.moved if stats else 0,
            batches=stats.batches if stats else 0,
            stall_max_s=stats.stall_max_s if stats else 0.0,
            duration_s=done - t_start,
            fallback=stats.fallback if stats else "",
            home=home_id if stats and stats.moved else "",
            home_requests=stats.home_requests if stats else [],
        )

    async def _copy_at(self, rank: int, copies: list[tuple[int, int]]) -> None:
        msg = el.CopyLocal(self.svc.cfg.admin_token, self.group_id, self.epoch, copies)
        await self.ask(self.members[rank], msg)

    def _copy_local(self, req: el.CopyLocal) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "follower")
        cache = kv_view(self.svc.engine.region.tensor(), self._full_layout, self.g)
        copy_sub_blocks(cache, req.copies)
        return el.Done(self.svc.cfg.instance_id)

    # ------------------------------------------------------- live restore: the home
    async def _home_open(self, req: el.HomeOpen) -> el.ElasticReply:
        """Give back the sub-blocks above the pre-drop capacity (the leader saw to it that
        the group uses none), shrink, take the whole model back from local disk while the
        stage keeps serving (its layer range is fixed, `StageServer.layers`), and run a
        solo engine on whole blocks [0, home_blocks) beside it."""
        self._same_group(req.group_id, req.epoch, "follower")
        svc = self.svc
        eng = svc.engine
        if eng.arena is not None:
            raise ElasticError("a live restore runs on CPU members only")
        if not 0 < req.home_blocks <= self.capacity_blocks:
            raise ElasticError(
                f"home region of {req.home_blocks} blocks outside (0, {self.capacity_blocks}]"
            )
        if self.home is not None:
            return await self._home_grow(req.home_blocks)
        await self._shrink_keeping(range(self.capacity_blocks * self.g))
        model = eng.engine.model
        config = eng.engine.config
        await eng.client.set_params(self.full_param_bytes)  # the budget first, then the pages
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, model.restore_layers, resolve_model(config.model))
        await eng.client.set_params(_resident(eng, model))
        full = kv_view(eng.region.tensor(), self._full_layout)
        # Recompute only: its blocks are the group's lease, no daemon swaps them meanwhile.
        solo = msgspec.structs.replace(config, preemption_mode="recompute")
        self.home = Engine(model, full, solo, BlockPool(req.home_blocks))
        self.home_blocks = req.home_blocks
        eng.engine = self.home
        eng.resume()
        log.info("home of a live restore", group=self.group_id, blocks=req.home_blocks)
        return el.Done(svc.cfg.instance_id, model.param_bytes())

    async def _home_grow(self, home_blocks: int) -> el.ElasticReply:
        """The leader moved the group's tail up: whole blocks up to `home_blocks` are free
        of group KV now and join the home's pool."""
        home = self._home()
        old = self.home_blocks
        if home_blocks <= old:
            raise ElasticError(f"the home region has {old} blocks already, not fewer")
        await self.svc.engine.run_between_steps(lambda: home.pool.add(range(old, home_blocks)))
        self.home_blocks = home_blocks
        return el.Done(self.svc.cfg.instance_id, home.model.param_bytes())

    async def _home_take(self, req: el.HomeTake) -> el.ElasticReply:
        """Reserve whole blocks for each request and copy this member's own sub-blocks of
        their group blocks into them (parked at the leader: nothing writes them now)."""
        self._same_group(req.group_id, req.epoch, "follower")
        home = self._home()
        sizes = [len(s.block_ids) for s in req.requests]
        need = sum(sizes)

        def take() -> list[int]:
            if home.pool.num_free < need:
                raise ElasticError(
                    f"the home has {home.pool.num_free} free blocks, the batch needs {need}"
                )
            return home.reserve_free(need)

        ids, free = await self.svc.engine.run_between_steps(lambda: (take(), home.pool.num_free))
        self.home_reserved.update(ids)
        self.home_pending.update({s.request_id: s for s in req.requests})
        blocks, i = [], 0
        for n in sizes:
            blocks.append(ids[i : i + n])
            i += n
        g, rank = self.g, self.rank
        table = self.stage_table
        copies = [
            (table[k], e * g + rank)
            for s, es in zip(req.requests, blocks, strict=True)
            for k, e in zip(s.block_ids, es, strict=True)
        ]
        copy_sub_blocks(kv_view(self.svc.engine.region.tensor(), self._full_layout, g), copies)
        return el.HomeBlocks(self.svc.cfg.instance_id, blocks, free)

    async def _home_adopt(self, req: el.HomeAdopt) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "follower")
        home = self._home()
        if req.release:  # the batch failed on its way: the leader keeps its requests
            release = [b for b in req.release if b in self.home_reserved]
            await self.svc.engine.run_between_steps(lambda: home.unreserve(release))
            self.home_reserved.difference_update(release)
            self.home_pending.clear()
        for state in req.requests:  # `Engine.adopt` takes its reserved blocks
            self.home_reserved.difference_update(state.block_ids)
            self.home_pending.pop(state.request_id, None)
            self.svc.adopt(state)
        return el.Done(self.svc.cfg.instance_id)

    def _home(self) -> Engine:
        if self.home is None:
            raise ElasticError(f"{self.svc.cfg.instance_id} is not the home of a live restore")
        return self.home

    async def _dissolve_home(self, requests: list[el.RequestState]) -> None:
        """The home leaves the group: its engine goes on as it is (whole model, whole
        blocks [0, home_blocks)); the daemon merges under it."""
        svc = self.svc
        eng = svc.engine
        home = self._home()
        self._close_stage()
        if self.home_reserved:  # a batch that never arrived (the leader died on the way)
            stale = sorted(self.home_reserved)
            await eng.run_between_steps(lambda: home.unreserve(stale))
            self.home_reserved = set()
        for state in self.home_pending.values():  # announced here, never adopted
            svc.fail_moved(state, f"group {self.group_id}: its leader did not finish the move")
        self.home_pending = {}
        # Shrinking again matters: the parameters' report at HomeOpen may have grown the KV
        # by a sub-block that is no whole block's (the budget is no multiple of one).
        await self._shrink_keeping(range(self.home_blocks * self.g))
        await eng.client.merge()
        eng.grouped = False  # leases and gives back whole blocks as any solo engine
        eng.group_lease = []
        for state in requests:
            svc.adopt(state)
        self._reset()
        log.info("home: serving alone", adopted=len(requests), requests=len(home.requests))

    async def _dissolve(self, req: el.Dissolve) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "follower")
        if self.home is not None:
            await self._dissolve_home(req.requests)
            return el.Done(self.svc.cfg.instance_id, self.svc.engine.engine.model.param_bytes())
        await self._dissolve_local(req.keep, req.requests)
        return el.Done(self.svc.cfg.instance_id, self.svc.engine.engine.model.param_bytes())

    async def _dissolve_local(self, keep: list[int], requests: list[el.RequestState]) -> None:
        """Give back every sub-block but those of `keep` (whole blocks), shrink and merge
        the daemon, reload the dropped layers, serve alone, adopt `requests`."""
        svc = self.svc
        eng = svc.engine
        g = self.g
        full = self._full_layout
        model = eng.engine.model
        config = eng.engine.config
        self._close_stage()
        await self._shrink_keeping({e * g + j for e in keep for j in range(g)})
        merged = await eng.client.merge()
        folder = resolve_model(config.model)
        loop = asyncio.get_running_loop()
        if eng.arena is not None:  # GPU: the parameters come back below the kept ones
            eng.arena.set_kv_bytes(merged.capacity_blocks * merged.block_bytes)
            await loop.run_in_executor(self.executor, eng.arena.restore, model, folder)
        else:
            await loop.run_in_executor(self.executor, model.restore_layers, folder)
        await eng.client.set_params(_resident(eng, model))
        eng.engine = Engine(model, kv_view(eng.region.tensor(), full), config, BlockPool())
        eng.grouped = False
        eng.group_lease = []
        for state in requests:
            svc.adopt(state)
        self._reset()
        eng.resume()
        log.info("serving alone again", adopted=len(requests), kept_blocks=len(keep))

    async def _shrink_keeping(self, keep: Collection[int]) -> None:
        """Give back every sub-block this member holds but those in `keep` and lower its
        daemon's ceiling to the pre-drop capacity (in sub-blocks): what a member does
        before it takes its parameters back or merges. Idempotent (a retry frees nothing
        twice)."""
        eng = self.svc.engine
        rest = [b for b in eng.group_lease if b not in keep]
        if rest:
            await eng.client.free_mem(rest)
            eng.group_lease = [b for b in eng.group_lease if b in keep]
            self.held = list(eng.group_lease)
        shrunk = await eng.client.shrink(self.capacity_blocks * self.g)
        if shrunk.pending_shrink:
            raise ElasticError(
                f"sub-blocks {shrunk.pending_shrink[:8]} still live above the ceiling"
            )

    async def _reload(self, model: Any, config: Any) -> None:
        """The dropped layers back from the checkpoint on local disk, the daemon told."""
        eng = self.svc.engine
        folder = resolve_model(config.model)
        loop = asyncio.get_running_loop()
        if eng.arena is not None:
            await loop.run_in_executor(self.executor, eng.arena.restore, model, folder)
        else:
            await loop.run_in_executor(self.executor, model.restore_layers, folder)
        await eng.client.set_params(_resident(eng, model))

    # ------------------------------------------------------------------- break
    async def _break(self, req: el.Break) -> el.ElasticReply:
        self._same_group(req.group_id, req.epoch, "leader", "follower", "prepared")
        svc = self.svc
        if self.state == "prepared":
            if self.timer is not None:
                self.timer.cancel()
            self._leave_prepared()
            return el.Done(svc.cfg.instance_id)
        log.warning("group broken", group=self.group_id, reason=req.reason)
        self._stop_exchange()
        at_home = self.home.requests if self.home is not None else {}
        for state in self.exported:  # gone with the group (the leader failed or died)
            if state.request_id not in at_home:
                svc.fail_moved(state, f"group {self.group_id} broke: {req.reason}")
        if self.exchanger is not None:  # exported, never joined: end them
            for state in self.exchanger.unjoined():
                svc.fail_moved(state, f"group {self.group_id} broke: {req.reason}")
        if self.state == "leader":
            self._close_stage()  # a step waiting on the ring fails now, not at its timeout
            await svc.engine.pause()
            why = f"group {self.group_id} broke: {req.reason}"
            await svc.engine._fail_all(why)
            svc.engine.fail_adopted_inbox(why)
        if self.home is not None:  # its requests at home go on
            await self._dissolve_home([])
            return el.Done(svc.cfg.instance_id, svc.engine.engine.model.param_bytes())
        await self._dissolve_local([], [])
        return el.Done(svc.cfg.instance_id, svc.engine.engine.model.param_bytes())

    # ---------------------------------------------------------------- helpers
    async def ask(self, member: el.Member, msg: el.ElasticRequest) -> el.ElasticReply:
        client: RpcClient[Any, Any] = RpcClient(member.control, el.ElasticRequest, el.ElasticReply)
        try:
            reply = await client.call(msg, timeout_s=_PEER_RPC_TIMEOUT_S)
        finally:
            client.close()
        if isinstance(reply, el.Refused):
            raise ElasticError(f"{member.instance_id}: {reply.error}")
        return reply

    def _close_stage(self) -> None:
        if self.stage_task is not None:
            self.stage_task.cancel()
            self.stage_task = None
        for sock in (self.stage_pull, self.stage_push):
            if sock is not None:
                sock.close()
        self.stage_pull = self.stage_push = None

    def _reset(self) -> None:
        self.state = "solo"
        self.group_id, self.epoch, self.rank = "", 0, -1
        self.members, self.followers, self.held, self.tables = [], [], [], []
        self.exchanger = self.exchange_task = None
        self.timer = None
        self.forwarding = False
        self.exported = []
        self.home = None
        self.home_blocks = 0
        self.home_reserved = set()
        self.home_pending = {}
        self.stage_table = []
        self.stage_server = None

    def _stop_exchange(self) -> None:
        if self.exchange_task is not None:
            self.exchange_task.cancel()

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._stop_exchange()
        self._close_stage()
        self.executor.shutdown(wait=False)


def _resident(eng: MempoolEngine, model: Any) -> int:
    """What the parameters occupy in the budget: the arena's footprint on a GPU."""
    return eng.arena.footprint if eng.arena is not None else int(model.param_bytes())
