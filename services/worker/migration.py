"""A worker's part in live migration (common/protocol/migrate.py): the source's stages and
the destination's reserved blocks. The plan of the stages is migration_plan.py's.

    source (Migrate from the scheduler)          destination
      live stages: Reserve ──────────────────▶    lease n blocks, held aside (not in the pool)
                   Transfer at its own daemon ══▶ bytes into the held blocks
      pause, last Reserve + Transfer, Arrive ─▶   adopt with the copied blocks, free the rest
      the request leaves the engine, resume       streams on (an empty chunk first: the
                                                  gateway moves the request's leg here)

Failure anywhere before `Arrived`: `Cancel` to the destination, resume; the request never
left the source engine, so it goes on there unchanged. While a live stage's transfer reads
the request's blocks, its end waits (`AsyncEngine.finish_gates`): a finishing request hands
its blocks to the daemon's index, which refuses blocks a transfer is reading. `Arrive`
carries a deadline well inside the source's wait, so a destination that answers too late
refuses it rather than run a second copy of a request the source resumed.

A migration needs both workers solo (not in a KunServe group) and runs one at a time on a
source (it pauses the source's engine at the end).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from common.auth import check_admin_token
from common.logging import get_logger
from common.mempool_client import MempoolClient
from common.protocol import migrate as mg
from common.protocol.elastic import RequestState
from common.sockets import RpcClient
from services.worker.mempool_engine import MempoolEngine
from services.worker.migration_plan import MigrationPlan, Stage
from services.worker.request import Request
from services.worker.sampler import generator_state

log = get_logger(__name__)


class MigrationHost(Protocol):
    """What migration needs of its worker (services/worker/service.py)."""

    cfg: Any  # WorkerConfig: instance_id, admin_token, mempool
    engine: MempoolEngine
    routes: dict[str, str]
    elastic: Any  # ElasticMember: `.state` ("solo" outside groups)

    @property
    def healthy(self) -> bool: ...

    def adopt(self, state: RequestState) -> None: ...


class MigrationError(RuntimeError):
    pass


class _Held:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.timer: asyncio.Task[None] | None = None


class Migration:
    def __init__(self, host: MigrationHost):
        self.svc = host
        self.held: dict[str, _Held] = {}  # destination: blocks reserved per incoming request
        self.lock = asyncio.Lock()  # source: one migration at a time
        self.migrated = 0
        self.arrived = 0

    def status(self) -> dict[str, Any]:
        return {
            "migrated": self.migrated,
            "arrived": self.arrived,
            "held_requests": len(self.held),
            "held_blocks": sum(len(h.ids) for h in self.held.values()),
        }

    async def handle(self, req: mg.MigrateRequest) -> mg.MigrateReply:
        if not check_admin_token(req.token, self.svc.cfg.admin_token):
            return mg.MigrateRefused("bad admin token")
        try:
            match req:
                case mg.Migrate():
                    return await self._migrate(req)
                case mg.Reserve():
                    return await self._reserve(req)
                case mg.Arrive():
                    return await self._arrive(req)
                case mg.Cancel():
                    return mg.Cancelled(await self._free_held(req.request_id))
        except MigrationError as exc:
            return mg.MigrateRefused(str(exc))
        except Exception as exc:
            log.error("migration step failed", message=type(req).__name__, exc_info=True)
            return mg.MigrateRefused(
                f"{type(req).__name__} failed on {self.svc.cfg.instance_id}: "
                f"{type(exc).__name__}: {exc}"
            )
        return mg.MigrateRefused(f"unknown migrate message {type(req).__name__}")

    def _check_solo(self) -> None:
        svc = self.svc
        if not svc.healthy or svc.engine.abandoned:
            raise MigrationError(f"{svc.cfg.instance_id} is not healthy")
        if svc.elastic.state != "solo" or svc.engine.grouped:
            raise MigrationError(f"{svc.cfg.instance_id} is in a KunServe group")

    # ------------------------------------------------------------------ source
    async def _migrate(self, req: mg.Migrate) -> mg.MigrateReply:
        svc, rid = self.svc, req.request_id
        me = svc.cfg.instance_id
        if req.dst.instance_id == me:
            raise MigrationError(f"{rid} already runs on {me}")
        if self.lock.locked():
            raise MigrationError(f"{me} is already migrating a request")
        async with self.lock:
            self._check_solo()
            if rid not in svc.engine.engine.requests or rid not in svc.routes:
                raise MigrationError(f"{me} runs no request {rid!r}")
            reply = await _SourceRun(svc, req).run()
            self.migrated += 1
            return reply

    # ------------------------------------------------------------- destination
    async def _reserve(self, req: mg.Reserve) -> mg.MigrateReply:
        self._check_solo()
        rid = req.request_id
        if rid in self.svc.engine.engine.requests or rid in self.svc.routes:
            raise MigrationError(f"{self.svc.cfg.instance_id} already runs {rid!r}")
        if req.n < 0:
            raise MigrationError(f"cannot reserve {req.n} blocks")
        held = self.held.setdefault(rid, _Held())
        ids = await self.svc.engine.client.alloc_mem(req.n, owner=self.svc.cfg.instance_id)
        if self.held.get(rid) is not held:  # cancelled (or expired) while leasing
            await self.svc.engine.client.free_mem(ids)
            raise MigrationError(f"the migration of {rid!r} was cancelled")
        held.ids.extend(ids)
        if held.timer is not None:
            held.timer.cancel()
        held.timer = asyncio.create_task(self._expire(rid, held, req.hold_s))
        return mg.Reserved(ids)

    async def _expire(self, rid: str, held: _Held, after_s: float) -> None:
        await asyncio.sleep(after_s)
        if self.held.get(rid) is held:
            held.timer = None  # this task: not to be cancelled by the free below
            freed = await self._free_held(rid)
            log.warning("a migration's reserved blocks expired", request_id=rid, freed=freed)

    async def _free_held(self, rid: str) -> int:
        held = self.held.pop(rid, None)
        if held is None:
            return 0
        if held.timer is not None:
            held.timer.cancel()
        if held.ids:
            await self.svc.engine.client.free_mem(held.ids)
        return len(held.ids)

    async def _arrive(self, req: mg.Arrive) -> mg.MigrateReply:
        state, svc = req.state, self.svc
        rid = state.request_id
        held = self.held.get(rid) or _Held()  # none reserved: a request without KV yet
        try:
            if req.deadline and time.time() > req.deadline:
                raise MigrationError(f"Arrive of {rid!r} came after its deadline")
            self._check_solo()
            if not set(state.block_ids) <= set(held.ids) or len(set(state.block_ids)) != len(
                state.block_ids
            ):
                raise MigrationError(f"{rid}: blocks {state.block_ids} were not reserved here")
            if rid in svc.engine.engine.requests or rid in svc.routes:
                raise MigrationError(f"{svc.cfg.instance_id} already runs {rid!r}")
            total = len(state.prompt_token_ids) + len(state.output_token_ids)
            if total >= svc.engine.engine.capacity_tokens:
                raise MigrationError(f"{rid}: {total} tokens do not fit this instance's KV")
        except BaseException:
            await self._free_held(rid)
            raise
        self.held.pop(rid, None)
        if held.timer is not None:
            held.timer.cancel()
        spare = [b for b in held.ids if b not in set(state.block_ids)]
        if spare:
            await svc.engine.client.free_mem(spare)
        svc.routes[rid] = state.reply_to  # at once: a second Arrive is refused
        svc.adopt(state)  # the engine claims state.block_ids when it admits the request
        self.arrived += 1
        return mg.Arrived(svc.cfg.instance_id)

    async def close(self) -> None:
        for rid in list(self.held):
            try:
                await self._free_held(rid)
            except Exception as exc:  # the daemon may be gone; it frees them with the owner
                log.warning("could not free reserved blocks", request_id=rid, error=str(exc))


class _SourceRun:
    """One migration from this worker: the stages, the hand-over, the cleanup."""

    def __init__(self, svc: MigrationHost, req: mg.Migrate):
        self.svc = svc
        self.req = req
        self.rid = req.request_id
        self.eng = svc.engine
        self.plan = MigrationPlan(svc.engine.block_size, req.threshold_blocks, req.max_stages)
        self.nbytes = 0
        self.peer: RpcClient[mg.MigrateRequest, mg.MigrateReply] = RpcClient(
            req.dst.control, mg.MigrateRequest, mg.MigrateReply
        )
        self.mempool = MempoolClient(svc.cfg.mempool)

    def _request(self) -> Request:
        req = self.eng.engine.requests.get(self.rid)
        if req is None:
            raise MigrationError(f"{self.rid} ended at {self.svc.cfg.instance_id} meanwhile")
        return req

    async def run(self) -> mg.MigrateReply:
        started = time.monotonic()
        try:
            return await self._run(started)
        except BaseException as exc:
            try:
                await asyncio.wait_for(self._call(mg.Cancel(self.req.token, self.rid)), 2.0)
            except Exception as cancel_exc:  # the destination frees them when its hold expires
                log.warning("could not cancel a migration", error=str(cancel_exc))
            log.warning("migration failed; the request stays", request_id=self.rid, error=str(exc))
            raise
        finally:
            self.peer.close()
            self.mempool.close()

    async def _run(self, started: float) -> mg.Migrated:
        while True:  # live stages: the request keeps decoding
            req = self._request()
            stage = self.plan.live_stage(
                list(req.block_ids), req.num_computed_tokens, req.num_preemptions
            )
            if stage is None:
                break
            gate = self.eng.finish_gates[self.rid] = asyncio.Event()
            try:
                await self._copy(stage)
            finally:
                gate.set()
                self.eng.finish_gates.pop(self.rid, None)
        if self.svc.elastic.state != "solo":  # a group formed meanwhile: its pause, not ours
            raise MigrationError(f"{self.svc.cfg.instance_id} joined a KunServe group")
        await self.eng.pause()
        paused = time.monotonic()
        try:
            req = self._request()
            stage = self.plan.final_stage(
                list(req.block_ids), req.num_computed_tokens, req.num_preemptions
            )
            await self._copy(stage)
            computed = req.num_computed_tokens
            state = _snapshot(
                req,
                reply_to=self.svc.routes[self.rid],
                block_ids=self.plan.adopted_blocks(computed),
            )
            deadline = time.time() + 0.5 * self.req.timeout_s
            reply = await self._call(mg.Arrive(self.req.token, state, deadline))
            if not isinstance(reply, mg.Arrived):
                raise MigrationError(_why(reply))
            # Adopted there: from here on the request is the destination's.
            await self.eng.export_one(self.rid, keep_kv=False)
        finally:
            self.eng.resume()
        done = time.monotonic()
        p = self.plan
        log.info(
            "migrated a request",
            request_id=self.rid,
            to=self.req.dst.instance_id,
            stages=p.stages,
            blocks=p.blocks_copied,
            pause_s=round(done - paused, 4),
        )
        return mg.Migrated(
            request_id=self.rid,
            src=self.svc.cfg.instance_id,
            dst=self.req.dst.instance_id,
            stages=p.stages,
            live_stages=p.live_stages,
            blocks=p.blocks_copied,
            bytes=self.nbytes,
            pause_s=done - paused,
            total_s=done - started,
            num_computed_tokens=computed,
            output_tokens=len(state.output_token_ids),
        )

    async def _copy(self, stage: Stage) -> None:
        need = self.plan.need(stage)
        if need:
            hold_s = 3 * self.req.timeout_s  # a source gone quiet: the destination frees them
            reply = await self._call(mg.Reserve(self.req.token, self.rid, need, hold_s))
            if not isinstance(reply, mg.Reserved) or len(reply.block_ids) != need:
                raise MigrationError(_why(reply))
            self.plan.dst.extend(reply.block_ids)
        if stage.src:
            done = await self.mempool.transfer(
                self.req.dst.mempool,
                stage.src,
                self.plan.dst_for(stage),
                timeout_s=self.req.timeout_s,
            )
            self.nbytes += done.nbytes
        self.plan.done(stage)

    async def _call(self, msg: mg.MigrateRequest) -> mg.MigrateReply:
        try:
            return await self.peer.call(msg, timeout_s=self.req.timeout_s)
        except Exception as exc:
            raise MigrationError(
                f"{self.req.dst.instance_id} did not answer {type(msg).__name__}: {exc}"
            ) from exc


def _snapshot(req: Request, *, reply_to: str, block_ids: list[int]) -> RequestState:
    """The request as it stands (paused): what the destination goes on with."""
    return RequestState(
        request_id=req.request_id,
        prompt_token_ids=list(req.prompt_token_ids),
        output_token_ids=list(req.output_token_ids),
        params=req.params,
        reply_to=reply_to,
        generator_state=generator_state(req.generator),
        num_cached_tokens=req.num_cached_tokens,
        output_offset=req.num_output_tokens,
        block_ids=block_ids,
        num_computed_tokens=req.num_computed_tokens,
    )


def _why(reply: Any) -> str:
    if isinstance(reply, mg.MigrateRefused):
        return reply.error
    return f"unexpected reply {type(reply).__name__}"
