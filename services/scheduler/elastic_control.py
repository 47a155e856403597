"""The elastic commands' steps over the workers' control sockets (common/protocol/elastic.py):
the shell's half of `services/scheduler/elastic.py`, which decides and records.

    elastic drop a,b   validate ─▶ Prepare ─▶ every member (parallel)
                         any not Ready in time, or Readys disagree ─▶ Abort ─▶ every member
                         Commit ─▶ followers (parallel) ─▶ Commit(+ their replies) ─▶ leader
                         a Commit failed ─▶ BROKEN: Break to whoever may have committed,
                                            Abort to whoever refused or was never told
    elastic restore G  Restore ─▶ leader: RESTORING, then DISSOLVED (failed: BROKEN + Break)
    a member down      (the core marked the group BROKEN) Break ─▶ each survivor

One drop or restore runs at a time (a lock), so two commands never race for the same
instances. Every call has a timeout and every failure becomes the admin's error message
(ElasticError): the scheduler's loop never waits on a worker beyond it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from common.logging import get_logger
from common.protocol.admin import AdminReply
from common.protocol.elastic import (
    Abort,
    Break,
    Commit,
    ElasticReply,
    ElasticRequest,
    FollowerCommitted,
    GroupServing,
    Member,
    Prepare,
    Ready,
    Refused,
    Restore,
    Restored,
)
from common.sockets import RpcClient, RpcError, RpcTimeout
from services.scheduler import monitor
from services.scheduler.core import GlobalScheduler
from services.scheduler.elastic import ElasticError, Group, parse_ids

log = get_logger(__name__)

# A prepared member resumes by itself after this many Prepare timeouts without a word.
PREPARED_FOR = 3.0

_Reply = ElasticReply | AdminReply  # a worker that does not know the channel answers AdminReply


class ElasticControl:
    def __init__(
        self,
        core: GlobalScheduler,
        token: str,
        clock: Callable[[], float],
        prepare_timeout_s: float,
        timeout_s: float,
        restore_live: bool = True,
    ) -> None:
        self.core = core
        self.token = token
        self.clock = clock  # monotonic (the core's)
        self.prepare_timeout_s = prepare_timeout_s
        self.timeout_s = timeout_s  # Commit and Restore
        self.restore_live = restore_live
        self.lock = asyncio.Lock()
        # Strategy `migrate`: how to move a request (the scheduler's MigrateControl).
        self.migrator: Callable[[str, str], Awaitable[AdminReply]] | None = None

    def _now(self) -> tuple[float, float]:
        return self.clock(), self.core.wall_clock()

    # ------------------------------------------------------------- admin
    async def command(self, args: Sequence[str]) -> AdminReply:
        """`elastic drop ID,ID[,...]` or `elastic restore GROUP|all` (status is the core's)."""
        try:
            match list(args):
                case ["drop", *ids] if ids:
                    # `recompute`: running requests are recomputed in the group instead of
                    # keeping their KV (the kunserve-recompute ablation).
                    exchange = "recompute" not in ids
                    ids = [i for i in ids if i != "recompute"]
                    return AdminReply(True, await self.drop(",".join(ids), exchange=exchange))
                case ["restore", target, *how] if how in ([], ["pause"], ["live"]):
                    # `pause`: the whole group stops while every request goes home at once.
                    live = self.restore_live if not how else how == ["live"]
                    return AdminReply(True, await self.restore(target, live=live))
        except ElasticError as exc:
            return AdminReply(False, error=str(exc))
        return AdminReply(
            False,
            error="wrong arguments for elastic: elastic status | "
            "elastic drop ID,ID[,...] [recompute] | "
            "elastic restore GROUP|all [live|pause] | elastic on|off",
        )

    # ------------------------------------------------------------- automatic
    async def decide(self, decision: monitor.Decision) -> None:
        """Run what the controller decided (controller.py) through the commanded drop and
        restore; every outcome goes into the timeline, never an exception to the loop."""
        controller, elastic = self.core.controller, self.core.elastic
        try:
            match decision:
                case monitor.Drop() if controller.strategy == "none":
                    pass  # votes are counted and shown, nothing else
                case monitor.Drop() if controller.strategy == "migrate":
                    await self._migrate(decision)
                case monitor.Drop():
                    plan = controller.plan(decision, self.clock())
                    for ids in plan.groups if plan is not None else []:
                        try:
                            group = await self.drop(",".join(ids), exchange=controller.exchange)
                            log.info("elastic controller: dropped", group=group["group_id"])
                        except ElasticError as exc:
                            elastic.note_controller(
                                "auto-drop-failed", *self._now(), members=ids, error=str(exc)
                            )
                case monitor.Restore():
                    try:
                        await self.restore(decision.group_id)
                        log.info("elastic controller: restored", group=decision.group_id)
                    except ElasticError as exc:
                        elastic.note_controller(
                            "auto-restore-failed",
                            *self._now(),
                            group=decision.group_id,
                            error=str(exc),
                        )
        finally:
            controller.changed(self.clock())

    async def _migrate(self, decision: monitor.Drop) -> None:
        """Strategy `migrate`: one request off the fullest voter (the KV-centric baseline)."""
        controller, elastic = self.core.controller, self.core.elastic
        pick = controller.pick_migration(decision, self.core.serving(), self.clock())
        if pick is None or self.migrator is None:
            return
        reply = await self.migrator(pick.request_id, pick.dst)
        if reply.ok:
            elastic.note_controller("migrated", *self._now(), **reply.result)
        else:
            elastic.note_controller(
                "migrate-failed", *self._now(), request_id=pick.request_id, error=reply.error
            )

    # ------------------------------------------------------------- drop
    async def drop(self, ids_text: str, *, exchange: bool = True) -> dict[str, Any]:
        async with self.lock:
            elastic, registry = self.core.elastic, self.core.registry
            ids = elastic.validate_drop(parse_ids(ids_text), registry)
            members = []
            for rank, iid in enumerate(ids):
                inst = registry.get(iid)
                assert inst is not None, "validated"
                members.append(Member(iid, rank, inst.control, inst.address, inst.mempool))
            controls = {m.instance_id: m.control for m in members}
            group = elastic.begin(ids, *self._now())
            gid, epoch = group.group_id, group.epoch
            log.info("elastic drop: prepare", group=gid, members=ids)

            prepare = Prepare(
                self.token,
                gid,
                epoch,
                members,
                timeout_s=PREPARED_FOR * self.prepare_timeout_s + self.timeout_s,
            )
            replies = await self._each(controls, ids, prepare, self.prepare_timeout_s)
            failed = _failures(replies, Ready)
            if failed:
                await self._abort(group, controls, "; ".join(failed.values()))
            readies = {iid: r for iid, r in replies.items() if isinstance(r, Ready)}
            try:
                elastic.ready(group, readies, *self._now())
            except ElasticError as exc:
                await self._abort(group, controls, str(exc))

            staged = [
                msgspec.structs.replace(m, stage=readies[m.instance_id].stage) for m in members
            ]
            commit = Commit(self.token, gid, epoch, staged, exchange=exchange)
            replies = await self._each(controls, group.followers, commit, self.timeout_s)
            failed = _failures(replies, FollowerCommitted)
            if failed:
                refused = [iid for iid in failed if isinstance(replies[iid], Refused)]
                await self._break_up(
                    group,
                    controls,
                    "follower commit failed: " + "; ".join(failed.values()),
                    abort_to=[group.leader, *refused],
                    break_to=[i for i in group.followers if i not in refused],
                )
            followers = [r for r in replies.values() if isinstance(r, FollowerCommitted)]
            elastic.followers_committed(group, followers, *self._now())

            commit = Commit(self.token, gid, epoch, staged, followers=followers, exchange=exchange)
            replies = await self._each(controls, [group.leader], commit, self.timeout_s)
            failed = _failures(replies, GroupServing)
            if failed:
                leader_refused = isinstance(replies[group.leader], Refused)
                await self._break_up(
                    group,
                    controls,
                    "leader commit failed: " + failed[group.leader],
                    abort_to=[group.leader] if leader_refused else [],
                    break_to=group.members if not leader_refused else group.followers,
                )
            serving = replies[group.leader]
            assert isinstance(serving, GroupServing)
            elastic.serving(group, serving, followers, *self._now())
            log.info("elastic drop: serving", group=gid, num_blocks=serving.num_blocks)
            # A member that went down while the group formed: the group is no good.
            gone = [m for m in ids if not self._alive(m)]
            if gone:
                await self._break_up(
                    group,
                    controls,
                    f"member {', '.join(gone)} went down while the group formed",
                    abort_to=[],
                    break_to=[m for m in ids if m not in gone],
                )
            return group.to_dict()

    def _alive(self, instance_id: str) -> bool:
        inst = self.core.registry.get(instance_id)
        return inst is not None and inst.healthy

    async def _abort(self, group: Group, controls: dict[str, str], reason: str) -> None:
        """Nothing was committed: Abort to every member, forget the group, raise."""
        abort = Abort(self.token, group.group_id, group.epoch)
        await self._each(controls, group.members, abort, self.prepare_timeout_s)
        self.core.elastic.abort(group, reason, *self._now())
        log.warning("elastic drop aborted", group=group.group_id, reason=reason)
        raise ElasticError(
            f"drop of {', '.join(group.members)} aborted: {reason}; nothing changed "
            f"(Abort sent to {', '.join(group.members)})"
        )

    async def _break_up(
        self,
        group: Group,
        controls: dict[str, str],
        reason: str,
        *,
        abort_to: Sequence[str],
        break_to: Sequence[str],
    ) -> None:
        """A commit went wrong: the group is BROKEN; members that may have committed get
        Break (they restore themselves), those that surely did not get Abort; raise."""
        elastic = self.core.elastic
        elastic.broken(group, reason, *self._now())
        gid, epoch = group.group_id, group.epoch
        await asyncio.gather(
            self._each(controls, abort_to, Abort(self.token, gid, epoch), self.prepare_timeout_s),
            self._send_break(group, break_to, reason, controls),
        )
        told = [f"Break to {', '.join(break_to)}"] if break_to else []
        told += [f"Abort to {', '.join(abort_to)}"] if abort_to else []
        log.warning("elastic group broken", group=gid, reason=reason)
        raise ElasticError(f"group {gid} broken: {reason} ({'; '.join(told) or 'nobody told'})")

    # ------------------------------------------------------------- restore
    async def restore(self, target: str, *, live: bool | None = None) -> dict[str, Any]:
        """Every request of each group goes home; `live` (default: `restore_live`) while
        the group keeps serving, the rest after half the timeout in one pause."""
        live = self.restore_live if live is None else live
        async with self.lock:
            elastic = self.core.elastic
            groups = elastic.resolve_restore(target)
            restored: list[dict[str, Any]] = []
            errors: list[str] = []
            for group in groups:
                gid = group.group_id
                elastic.restoring(group, *self._now())
                controls = self._controls(group.members)
                msg = Restore(
                    self.token, gid, group.epoch, live=live, live_timeout_s=self.timeout_s / 2
                )
                replies = await self._each(controls, [group.leader], msg, self.timeout_s)
                reply = replies[group.leader]
                if isinstance(reply, Restored):
                    elastic.dissolved(group, reply, *self._now())
                    rebalanced = await self._rebalance(group.leader, reply)
                    restored.append(
                        {
                            "group_id": gid,
                            "members": group.members,
                            "moved": reply.moved,
                            "recomputed": reply.recomputed,
                            "moved_bytes": reply.moved_bytes,
                            "pause_s": reply.pause_s,
                            "live": reply.live,
                            "moved_live": reply.moved_live,
                            "batches": reply.batches,
                            "stall_max_s": reply.stall_max_s,
                            "duration_s": reply.duration_s,
                            "fallback": reply.fallback,
                            "rebalanced": rebalanced,
                        }
                    )
                    continue
                reason = "restore failed: " + _failures(replies, Restored)[group.leader]
                elastic.broken(group, reason, *self._now())
                await self._send_break(group, group.members, reason, controls)
                errors.append(f"group {gid} broken: {reason} (Break to {', '.join(group.members)})")
            if errors:
                done = ", ".join(r["group_id"] for r in restored)
                raise ElasticError("; ".join(errors) + (f"; restored {done}" if done else ""))
            return {"restored": restored}

    async def _rebalance(self, leader: str, reply: Restored) -> int:
        """A live restore sent its requests to one home: migrate (Llumnix-style, live)
        the largest of them back to the leader while that evens out their tokens, so both
        instances serve again. Returns how many moved; a failed move only costs balance."""
        if not reply.home_requests or not reply.home:
            return 0
        for rid, _ in reply.home_requests:  # placed on the group: they run at the home now
            self.core.move_charge(rid, leader, reply.home)
        if self.migrator is None:
            return 0
        at_home = sum(t for _, t in reply.home_requests)
        at_leader = 0
        moved = 0
        for rid, tokens in sorted(reply.home_requests, key=lambda r: -r[1]):
            if at_leader + tokens > at_home - tokens:
                continue
            done = await self.migrator(rid, leader)
            if done.ok:
                at_home, at_leader, moved = at_home - tokens, at_leader + tokens, moved + 1
        self.core.elastic.note_controller(
            "rebalanced", *self._now(), home=reply.home, leader=leader, moved=moved
        )
        return moved

    # ------------------------------------------------------------- breaks
    async def send_breaks(self) -> None:
        """Break to the survivors of every group a member's death broke (core's list)."""
        for group, survivors in self.core.elastic.take_breaks():
            await self._send_break(group, survivors, group.reason, self._controls(survivors))

    async def _send_break(
        self, group: Group, to: Sequence[str], reason: str, controls: dict[str, str]
    ) -> None:
        if not to:
            return
        msg = Break(self.token, group.group_id, group.epoch, reason)
        replies = await self._each(controls, to, msg, self.timeout_s)
        answers = {iid: _describe(iid, r) for iid, r in replies.items()}
        self.core.elastic.note(group, "break-sent", *self._now(), answers=answers)

    # ------------------------------------------------------------- calls
    def _controls(self, ids: Sequence[str]) -> dict[str, str]:
        out = {}
        for iid in ids:
            inst = self.core.registry.get(iid)
            if inst is not None and inst.control:
                out[iid] = inst.control
        return out

    async def _each(
        self, controls: dict[str, str], ids: Sequence[str], msg: ElasticRequest, timeout_s: float
    ) -> dict[str, _Reply | str]:
        """`msg` to each of `ids` at once: its reply, or why there is none."""

        async def one(iid: str) -> _Reply | str:
            control = controls.get(iid)
            if not control:
                return f"{iid} is not registered"
            client: RpcClient[ElasticRequest, _Reply] = RpcClient(control, ElasticRequest, _Reply)
            try:
                return await client.call(msg, timeout_s)
            except RpcTimeout:
                return f"{iid} did not answer {type(msg).__name__} within {timeout_s:g} s"
            except (RpcError, OSError) as exc:
                return f"{iid}: {exc}"
            finally:
                client.close()

        results = await asyncio.gather(*(one(i) for i in ids))
        return dict(zip(ids, results, strict=True))


def _failures(replies: dict[str, _Reply | str], want: type) -> dict[str, str]:
    """Why each reply that is not a `want` failed."""
    return {iid: _describe(iid, r) for iid, r in replies.items() if not isinstance(r, want)}


def _describe(iid: str, reply: _Reply | str) -> str:
    match reply:
        case str():
            return reply
        case Refused(error=error):
            return f"{iid} refused: {error}"
        case AdminReply(ok=False, error=error):
            return f"{iid}: {error}"
        case AdminReply():
            return f"{iid} answered an admin reply (no elastic channel there)"
    return type(reply).__name__
