"""The global scheduler's core: where each request runs, and what it owes there.

    Heartbeat ──▶ Registry (who is up)          KvEventBatch ──▶ GlobalPromptTree per role
                        │                                            │ match (hash once)
    Place ──▶ eligible instances of the role ──▶ Candidates(load, matched, kv usage)
                  ──▶ Policy.choose ──▶ CostModel.fetch ──▶ charge ──▶ Placement
    Release ──▶ take the charge back          tick ──▶ expire instances, tree TTL, charges

Modes (common/protocol/worker.py has the flag table): colocated places on one colocated
instance (Placement.cache = cfg.caching); the P/D modes place the prompt on a prefill
instance and hand off to a decode instance, both chosen by the policy on their own role's
tree (the decode side's prefix matters in pd-caching-2/3: only missing blocks move).

Charges, in tokens, made at placement so the next placement already sees them:
- prefill (or colocated) instance: prompt - expected cached tokens ("prefill" leg);
- colocated also max_tokens, P/D decode instance prompt + max_tokens ("decode" leg).
Release(phase="prefill") takes back the prefill leg, "all" every leg; a second release
takes nothing (Released(charged=False)). A leg is recorded with its instance's epoch:
charges of an instance that restarted or was dropped vanish with that incarnation. So do
the other legs of its requests, at once (no phantom load until `charge_ttl_s`): a request
whose instance died holds nothing anywhere; its record stays, emptied, so the gateway's
release still answers Released(charged=True) and takes nothing.

A charge placed by a gateway that named its incarnation (`Place.gateway`) is owned by it:
when that incarnation falls silent (no `GatewayAlive` for a few of its intervals) or a
later incarnation of the same gateway id appears, every charge it owns is taken back at
once, as if released: a dead gateway never releases, and its requests died with it.

Pipeline groups (elastic.py): a SERVING (or RESTORING) group is one placement target,
its leader: the followers are no candidates of their own, the leader's candidate carries
every member's charges, and its placements get `cache=False` (no context caching in a
group: its KV is split across the members). A member that goes down breaks its group.

Pure and synchronous: every time is the caller's monotonic `now`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.auth import check_admin_token
from common.errors import InvalidRequestError, MemServeError
from common.modes import MODES, ROLES, Mode, parse_mode
from common.protocol.admin import COMMANDS, AdminReply
from common.protocol.kv_events import KvEventBatch
from common.protocol.mempool import IndexSnapshotReply
from common.protocol.scheduler import (
    GatewayAlive,
    GatewayKnown,
    Heartbeat,
    InstanceDown,
    InstanceEvent,
    InstanceUp,
    Place,
    Placement,
    Release,
    Released,
)
from common.protocol.worker import HandOff
from services.scheduler.config import POLICIES, SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.elastic import ACTIVE, Elastic
from services.scheduler.gateways import GatewayTable, Incarnation
from services.scheduler.global_tree import GlobalPromptTree, PromptHashes
from services.scheduler.policy import Candidate, CostModel, Policy, RequestInfo, make_policy
from services.scheduler.registry import ClaimRefusedError, Instance, Registry, RegistryFullError

PHASES = ("prefill", "all")
# Admin commands the asyncio shell runs itself (they talk to other processes).
SERVICE_COMMANDS = ("cache-stats", "flush-cache", "shutdown", "migrate")
# `elastic` subcommands the shell runs (they talk to workers); `elastic status` is here.
ELASTIC_SERVICE = ("drop", "restore")


class NoInstanceError(MemServeError):
    """No instance of a role the mode needs can take a placement now."""


@dataclass
class _Leg:
    instance_id: str
    epoch: int
    tokens: int
    phase: str  # "prefill" | "decode"


@dataclass
class _Charge:
    legs: list[_Leg]
    placed_at: float
    gateway: Incarnation | None = None  # its owner (None: TTL only)


class GlobalScheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.registry = Registry(cfg.heartbeat_timeout_s, cfg.max_instances)
        self.trees = {role: GlobalPromptTree(role, cfg.tree_ttl_s) for role in ROLES}
        self.cost = CostModel(
            cfg.prefill_tokens_per_s,
            cfg.attention_coeff,
            cfg.transfer_bytes_per_s,
            cfg.min_fetch_tokens,
        )
        self.policy = cfg.policy
        self.policies = self._make_policies(cfg.policy)
        # Insertion order is placement order (a re-placement moves to the end), so expiry
        # of forgotten charges only looks at the front.
        self.charges: dict[str, _Charge] = {}
        # Gateways silent for a few of their own intervals, and never less than a few
        # instance heartbeat timeouts, are dead.
        self.gateways = GatewayTable(min_timeout_s=3 * cfg.heartbeat_timeout_s)
        self.counters: Counter[str] = Counter()
        # Instances whose trees lost events and wait for a snapshot the shell fetches.
        self.want_snapshot: set[str] = set()
        self.elastic = Elastic()
        # The wall clock of elastic events only (the timeline shows both clocks).
        self.wall_clock: Callable[[], float] = time.time
        # The automatic drop / restore (`elastic on|off`); the shell polls it.
        self.controller = Controller(cfg, self.registry, self.elastic, lambda: self.wall_clock())

    # ----------------------------------------------------------- instances
    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[InstanceEvent]:
        """Register / refresh an instance; returns the events to publish. Raises ValueError
        for a heartbeat that describes no usable instance, RegistryFullError for a new one
        beyond `max_instances`."""
        try:
            seen = self.registry.heartbeat(hb, now)
        except RegistryFullError:
            self.counters["refused_registrations"] += 1
            raise
        except ClaimRefusedError:
            self.counters["refused_claims"] += 1
            raise
        inst = seen.instance
        events: list[InstanceEvent] = []
        if seen.replaced is not None:
            self._forget(seen.replaced)
            self.counters["restarts"] += 1
            events.append(InstanceDown(inst.instance_id, "restarted"))
        if seen.new:
            self.counters["registrations"] += 1
            if inst.healthy:
                events.append(InstanceUp(inst.instance_id, inst.role))
        elif seen.health_changed:
            if inst.healthy:
                events.append(InstanceUp(inst.instance_id, inst.role))
            else:
                # Its daemon is gone and its KV with it: nothing there can be matched.
                self.trees[inst.role].remove_instance(inst.instance_id)
                events.append(InstanceDown(inst.instance_id, "unhealthy (lost its MemPool daemon)"))
        self._groups_lose(events, now)
        return events

    def _groups_lose(self, events: list[InstanceEvent], now: float) -> None:
        """A member going down breaks its group (the shell sends the survivors Break)."""
        for e in events:
            if isinstance(e, InstanceDown):
                self.elastic.on_instance_down(e.instance_id, e.reason, now, self.wall_clock())

    def on_kv_events(self, instance_id: str, batch: KvEventBatch, now: float) -> bool:
        """Apply a batch from `instance_id`'s daemon; False when the instance is unknown.
        `self.want_snapshot` gets the instance when the batch showed lost events and its
        daemon answers snapshots (see `GlobalPromptTree.apply`)."""
        inst = self.registry.get(instance_id)
        if inst is None:
            return False
        if self.trees[inst.role].apply(batch, now, instance_id) and self.trees[inst.role].syncing(
            instance_id
        ):
            self.want_snapshot.add(instance_id)
        return True

    # ----------------------------------------------------- index snapshots
    def begin_sync(self, instance_id: str) -> bool:
        """The shell fetches `instance_id`'s index snapshot: its batches wait for it."""
        inst = self.registry.get(instance_id)
        if inst is None:
            return False
        self.trees[inst.role].begin_sync(instance_id, inst.block_size)
        return True

    def on_snapshot(self, instance_id: str, snap: IndexSnapshotReply, now: float) -> None:
        """Load a fetched snapshot (of the current incarnation: the shell checks)."""
        inst = self.registry.get(instance_id)
        if inst is None:
            return
        self.counters["snapshots_loaded"] += 1
        if self.trees[inst.role].load(instance_id, snap, now):
            self.want_snapshot.add(instance_id)

    def unconfirmed_snapshots(self, now: float, after_s: float) -> list[str]:
        """Instances whose loaded snapshot's own batch has not come within `after_s`."""
        return [i for tree in self.trees.values() for i in tree.unconfirmed(now, after_s)]

    def on_snapshot_failed(self, instance_id: str, now: float) -> None:
        inst = self.registry.get(instance_id)
        if inst is not None:
            self.counters["snapshots_failed"] += 1
            self.trees[inst.role].fallback(instance_id, now)

    def tick(self, now: float) -> list[InstanceEvent]:
        """Drop silent instances, forget cached blocks past the TTL and placements never
        released; returns the events to publish."""
        events: list[InstanceEvent] = []
        for inst in self.registry.expire(now):
            self._forget(inst)
            self.counters["expired_instances"] += 1
            silent = now - inst.last_seen
            events.append(InstanceDown(inst.instance_id, f"no heartbeat for {silent:.1f} s"))
        for tree in self.trees.values():
            tree.expire(now)
        for incarnation in self.gateways.expire(now):
            self._drop_gateway(incarnation, "silent_gateways")
        deadline = now - self.cfg.charge_ttl_s
        stale = []
        for rid, charge in self.charges.items():
            if charge.placed_at >= deadline:
                break
            stale.append(rid)
        for rid in stale:
            self._take_back(rid, "all")
            self.counters["expired_charges"] += 1
        self._groups_lose(events, now)
        return events

    def _forget(self, inst: Instance) -> None:
        """`inst`'s incarnation is gone (dropped or restarted): its tree entries, and every
        charge of a request placed on it, on whichever instance."""
        self.trees[inst.role].remove_instance(inst.instance_id)
        # Its own legs need no work (they carry an epoch no instance has any more); the
        # other legs of its requests would charge the survivors for work that never comes.
        for charge in self.charges.values():
            if not any(_on(leg, inst) for leg in charge.legs):
                continue
            for leg in charge.legs:
                other = self.registry.get(leg.instance_id)
                if other is not None and other.epoch == leg.epoch:
                    other.charged_tokens -= leg.tokens
                leg.tokens = 0
            self.counters["dropped_charges"] += 1

    # ----------------------------------------------------------- gateways
    def on_gateway_alive(self, msg: GatewayAlive, now: float) -> GatewayKnown:
        """A gateway incarnation's sign of life; a later one drops the earlier's charges."""
        current = self._gateway_seen(msg.gateway, msg.started_at, now, msg.interval_s)
        counts = {role: len(self.registry.eligible(role)) for role in ROLES}
        needs = list(Mode.of(self.cfg.mode, self.cfg.caching).roles)
        return GatewayKnown(current, counts, needs)

    def _gateway_seen(
        self, gateway: str, started_at: float, now: float, interval_s: float | None = None
    ) -> bool:
        seen = self.gateways.seen(gateway, started_at, now, interval_s)
        if seen.replaced is not None:
            self._drop_gateway(seen.replaced, "restarted_gateways")
        return seen.current

    def _drop_gateway(self, incarnation: Incarnation, why: str) -> None:
        """Take back every charge `incarnation` owns: nobody will release them."""
        self.counters[why] += 1
        owned = [rid for rid, c in self.charges.items() if c.gateway == incarnation]
        for rid in owned:
            self._take_back(rid, "all")
        self.counters["dropped_gateway_charges"] += len(owned)

    # ----------------------------------------------------------- placement
    def place(self, req: Place, now: float) -> Placement:
        if not req.token_ids:
            raise InvalidRequestError(f"request {req.request_id!r} has an empty prompt")
        if req.max_tokens < 0:
            raise InvalidRequestError(f"request {req.request_id!r}: max_tokens < 0")
        mode = Mode.of(self.cfg.mode, self.cfg.caching)
        colocated = not mode.disaggregated
        first_role, cache, decode_cache = mode.first_role, mode.cache, mode.decode_cache
        # Check every role before choosing, so a refusal leaves no turn or charge behind.
        avoid = frozenset(req.avoid)
        firsts = self._need(first_role, avoid)
        decodes = [] if colocated else self._need("decode", avoid)
        if req.request_id in self.charges:  # placed again (a retry): the new charge replaces it
            self._take_back(req.request_id, "all")
        owner: Incarnation | None = None
        if req.gateway and self._gateway_seen(req.gateway, req.gateway_started_at, now):
            owner = (req.gateway, req.gateway_started_at)

        n = len(req.token_ids)
        info = RequestInfo(n, req.session_id)
        # A worker matches at most all but the last prompt token: hash no further.
        prompt = PromptHashes(req.token_ids, max_tokens=n - 1)
        choice = self.policies[first_role].choose(
            self._candidates(firsts, prompt if cache else None), info
        )
        first = choice.candidate
        self.counters[f"chose_{choice.reason}"] += 1
        if self.elastic.leader_group(first.instance_id) is not None:
            # A group: its KV is split over the members, so no context caching there.
            cache = False
            self.counters["group_placements"] += 1
        fetch = None
        if cache and self.cfg.fetch:
            grouped = self._grouped()
            # Drained instances still hold their cache and their daemons still serve it.
            sources = [
                i
                for i in self.registry.instances()
                if i.role == first_role
                and i.healthy
                and i.instance_id != first.instance_id
                and i.instance_id not in avoid
                and i.instance_id not in grouped
            ]
            fetch = self.cost.fetch(first, self._candidates(sources, prompt), n)
        cached = first.matched_tokens
        expected = max(cached, fetch.num_tokens) if fetch is not None else cached
        first_inst = self._instance(first.instance_id)
        legs = [_Leg(first.instance_id, first_inst.epoch, n - expected, "prefill")]
        handoff = None
        if colocated:
            legs.append(_Leg(first.instance_id, first_inst.epoch, req.max_tokens, "decode"))
        else:
            dchoice = self.policies["decode"].choose(
                self._candidates(decodes, prompt if decode_cache else None), info
            )
            dec = self._instance(dchoice.candidate.instance_id)
            legs.append(_Leg(dec.instance_id, dec.epoch, n + req.max_tokens, "decode"))
            handoff = HandOff(
                dec.instance_id,
                address=dec.address,
                mempool=dec.mempool,
                insert=mode.handoff_insert,
                cache=mode.decode_cache,
                return_kv=mode.return_kv,
            )
        for leg in legs:
            self._instance(leg.instance_id).charged_tokens += leg.tokens
        self.charges[req.request_id] = _Charge(legs, now, owner)
        self.counters["placements"] += 1
        if fetch is not None:
            self.counters["fetches"] += 1
        return Placement(
            req.request_id,
            first.instance_id,
            address=first_inst.address,
            mode=self.cfg.mode,
            policy=self.policy,
            cache=cache,
            handoff=handoff,
            fetch=fetch,
            cached_tokens=cached,
        )

    def release(self, req: Release) -> Released:
        if req.phase not in PHASES:
            raise InvalidRequestError(f"release phase must be prefill or all, got {req.phase!r}")
        charged = self._take_back(req.request_id, req.phase)
        if charged:
            self.counters["releases"] += 1
        return Released(charged)

    def _take_back(self, request_id: str, phase: str) -> bool:
        charge = self.charges.get(request_id)
        if charge is None:
            return False
        phases = ("prefill",) if phase == "prefill" else ("prefill", "decode")
        taken = [leg for leg in charge.legs if leg.phase in phases]
        if not taken:
            return False
        for leg in taken:
            inst = self.registry.get(leg.instance_id)
            if inst is not None and inst.epoch == leg.epoch:
                inst.charged_tokens -= leg.tokens
        charge.legs = [leg for leg in charge.legs if leg.phase not in phases]
        if not charge.legs:
            del self.charges[request_id]
        return True

    def serving(self) -> dict[str, str]:
        """Each placed request's streaming instance (its last leg): where it runs now."""
        return {rid: c.legs[-1].instance_id for rid, c in self.charges.items() if c.legs}

    def move_charge(self, request_id: str, src: str, dst: str) -> int:
        """A request migrated: its legs on `src` now charge `dst`. Returns the legs moved."""
        charge = self.charges.get(request_id)
        to = self.registry.get(dst)
        if charge is None or to is None:
            return 0
        moved = 0
        for leg in charge.legs:
            if leg.instance_id != src:
                continue
            old = self.registry.get(src)
            if old is not None and old.epoch == leg.epoch:
                old.charged_tokens -= leg.tokens
            leg.instance_id, leg.epoch = dst, to.epoch
            to.charged_tokens += leg.tokens
            moved += 1
        self.counters["migrations"] += bool(moved)
        return moved

    def _need(self, role: str, avoid: frozenset[str] = frozenset()) -> list[Instance]:
        """The eligible instances of `role` not avoided; a group counts once, as its leader."""
        eligible = self.registry.eligible(role)
        hidden = self.elastic.hidden()
        if avoid or hidden:
            eligible = [i for i in eligible if i.instance_id not in avoid | hidden]
        if not eligible:
            others = [
                f"{i.instance_id} ({self.registry.state(i)})"
                for i in self.registry.instances()
                if i.role == role
            ]
            avoided = f"; avoiding {', '.join(sorted(avoid))}" if avoid else ""
            raise NoInstanceError(
                f"no eligible {role} instance for mode {self.cfg.mode} "
                f"(registered {role} instances: {', '.join(others) or 'none'}{avoided})"
            )
        return eligible

    def _candidates(
        self, instances: Sequence[Instance], prompt: PromptHashes | None
    ) -> list[Candidate]:
        out = []
        for i in instances:
            group = self.elastic.leader_group(i.instance_id)
            if group is None:
                load, usage = i.charged_tokens, i.kv_usage
                matched = (
                    self.trees[i.role].match(prompt, i.instance_id) if prompt is not None else 0
                )
            else:  # the whole group: every member's charges, the mean KV usage, no cache
                members = [m for m in map(self.registry.get, group.members) if m is not None]
                load = sum(m.charged_tokens for m in members)
                usage = sum(m.kv_usage for m in members) / len(members)
                matched = 0
            out.append(
                Candidate(
                    i.instance_id, load, matched, usage, i.mempool, i.block_size, i.block_bytes
                )
            )
        return out

    def _grouped(self) -> set[str]:
        """Members of active groups: their KV is not theirs alone (no fetch from them)."""
        return {m for g in self.elastic.groups.values() if g.state in ACTIVE for m in g.members}

    def _instance(self, instance_id: str) -> Instance:
        inst = self.registry.get(instance_id)
        assert inst is not None, "candidates come from the registry"
        return inst

    # --------------------------------------------------------------- policy
    def _make_policies(self, name: str) -> dict[str, Policy]:
        cfg = self.cfg
        return {
            role: make_policy(
                name,
                abs_threshold_tokens=cfg.balance_abs_threshold_tokens,
                rel_threshold=cfg.balance_rel_threshold,
                cache_threshold=cfg.cache_threshold,
            )
            for role in ROLES
        }

    def set_policy(self, name: str) -> None:
        """Switch the routing policy now (turns and session affinities start afresh)."""
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
        self.policies = self._make_policies(name)
        self.policy = name

    @property
    def mode_name(self) -> str:
        """The caching mode, with colocated serving without caching as `colocated-nocache`."""
        return Mode.of(self.cfg.mode, self.cfg.caching).name

    def set_mode(self, name: str) -> None:
        """Switch the caching mode for new placements (requests in flight keep theirs)."""
        mode = parse_mode(name)
        self.cfg.mode, self.cfg.caching = mode.base, mode.cache or mode.disaggregated

    # ---------------------------------------------------------------- admin
    def authorize(self, token: str) -> bool:
        """Whether `token` is the cluster's admin token (constant-time compare)."""
        return check_admin_token(token, self.cfg.admin_token)

    def admin(self, command: str, args: Sequence[str], now: float) -> AdminReply:
        """The admin commands that need no other process. The token is checked by the
        caller (`authorize`) before this runs."""
        try:
            match command, list(args):
                case "status", []:
                    return AdminReply(True, self.status(now))
                case "instances", []:
                    return AdminReply(True, self.describe_instances(now))
                case "drain", [iid]:
                    inst = self.registry.drain(iid)
                    return AdminReply(True, {"drained": iid, "role": inst.role})
                case "undrain", [iid]:
                    self.registry.undrain(iid)
                    return AdminReply(True, {"undrained": iid})
                case "policy", []:
                    return AdminReply(True, {"policy": self.policy})
                case "policy", [name]:
                    was = self.policy
                    self.set_policy(name)
                    return AdminReply(True, {"policy": name, "was": was})
                case "mode", []:
                    return AdminReply(True, {"mode": self.mode_name})
                case "mode", [name]:
                    was = self.mode_name
                    self.set_mode(name)
                    return AdminReply(True, {"mode": name, "was": was})
                case "elastic", ["status"]:
                    return AdminReply(
                        True, {**self.elastic.status(), "controller": self.controller.status(now)}
                    )
                case "elastic", [("on" | "off") as switch]:
                    return AdminReply(True, self.controller.set_enabled(switch == "on", now))
                case "elastic", [sub, *_] if sub in ELASTIC_SERVICE:
                    return AdminReply(False, error=f"elastic {sub} is run by the scheduler service")
                case (
                    ("status" | "instances" | "drain" | "undrain" | "policy" | "mode" | "elastic"),
                    _,
                ):
                    return AdminReply(
                        False, error=f"wrong arguments for {command}: {_USAGE[command]}"
                    )
        except (MemServeError, ValueError) as exc:
            return AdminReply(False, error=str(exc))
        if command in SERVICE_COMMANDS:
            return AdminReply(False, error=f"{command} is run by the scheduler service")
        return AdminReply(
            False, error=f"unknown command {command!r}; the scheduler answers {', '.join(COMMANDS)}"
        )

    def status(self, now: float) -> dict[str, Any]:
        roles: dict[str, dict[str, int]] = {}
        for inst in self.registry.instances():
            states = roles.setdefault(inst.role, {"up": 0, "drained": 0, "unhealthy": 0})
            states[self.registry.state(inst)] += 1
        return {
            "service": "scheduler",
            "instance_id": self.cfg.instance_id,
            "mode": self.cfg.mode,
            "caching": self.cfg.caching
            if self.cfg.mode == "colocated"
            else self.cfg.mode != "pd-basic",
            "policy": self.policy,
            "instances": roles,
            "in_flight": len(self.charges),
            "gateways": len(self.gateways),
            "charged_tokens": sum(i.charged_tokens for i in self.registry.instances()),
            "cached_blocks": {
                role: sum(tree.num_blocks(i) for i in tree.instances())
                for role, tree in self.trees.items()
                if tree.instances()
            },
            "resyncs": sum(tree.resyncs for tree in self.trees.values()),
            "groups": {
                state: n
                for state, n in Counter(g.state for g in self.elastic.groups.values()).items()
            },
            "counters": dict(sorted(self.counters.items())),
        }

    def describe_instances(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "instance_id": i.instance_id,
                "role": i.role,
                "state": self.registry.state(i),
                "charged_tokens": i.charged_tokens,
                "waiting": i.load.waiting_requests,
                "running": i.load.running_requests,
                "kv_used_blocks": i.load.kv_used_blocks,
                "kv_total_blocks": i.load.kv_total_blocks,
                # The elastic controller's signals, in the engine's blocks (a leader's: the
                # group's; a follower's: 0).
                "used_blocks": i.load.used_blocks,
                "waiting_blocks": i.load.waiting_blocks,
                "capacity_blocks": i.load.capacity_blocks,
                "cached_blocks": self.trees[i.role].num_blocks(i.instance_id),
                "group": g.group_id if (g := self.elastic.group_of(i.instance_id)) else "",
                "last_seen_s": round(now - i.last_seen, 3),
                "address": i.address,
                "mempool": i.mempool,
            }
            for i in self.registry.instances()
        ]


def _on(leg: _Leg, inst: Instance) -> bool:
    return leg.instance_id == inst.instance_id and leg.epoch == inst.epoch


_USAGE = {
    "status": "status",
    "instances": "instances",
    "drain": "drain INSTANCE_ID",
    "undrain": "undrain INSTANCE_ID",
    "policy": "policy [NAME]",
    "mode": f"mode [{'|'.join(MODES)}]",
    "elastic": "elastic status | elastic drop ID,ID[,...] | elastic restore GROUP|all | "
    "elastic on|off",
}
