"""The "admin" channel: `memserve admin` -> a service's control socket (RPC).

The scheduler's admin socket serves every command; the gateway, workers and MemPool
daemons answer `status` (and `shutdown`, which the scheduler's `shutdown` fans out).
Every request carries the cluster's admin token from the config; a wrong token is refused
before the command is looked at. Control sockets bind to loopback unless configured
otherwise.

| command     | args         | result                                                  |
| ----------- | ------------ | ------------------------------------------------------- |
| status      |              | the service's kind, id, uptime and a summary            |
| instances   |              | every registered instance, its role, load and state     |
| drain       | INSTANCE_ID  | no new placements there; running requests finish         |
| undrain     | INSTANCE_ID  | placements there again                                  |
| policy      | [NAME]       | the routing policy (set it when NAME is given)          |
| mode        | [NAME]       | the caching mode (set it: colocated, colocated-nocache,  |
|             |              | pd-basic, pd-caching-1/2/3); running requests keep theirs|
| cache-stats |              | each daemon's stats and the cluster's hit rate           |
| flush-cache |              | every daemon evicts every unpinned cached block         |
| shutdown    |              | stop the cluster (workers, daemons, gateway, scheduler) |
| elastic     | status       | pipeline groups: members, ranks, layers, lent bytes,     |
|             |              | state, and the timeline of events (both clocks)          |
| elastic     | drop ID,ID.. | form a group (lowest id leads); answers its id, figures |
|             | [recompute]  | running requests keep their KV (live exchange) unless   |
|             |              | `recompute` is given                                    |
| elastic     | restore G|all| dissolve group G (or every serving group)              |
| migrate     |              | every placed request and the instance it runs on        |
| migrate     | RID INSTANCE | move running request RID, with its KV, to INSTANCE      |
|             |              | while it decodes (Llumnix-style); answers stages,       |
|             |              | blocks and bytes copied, pause time                     |
| elastic     | on | off     | the automatic controller (drop / restore from load)     |
"""

from __future__ import annotations

from typing import Any

import msgspec

COMMANDS = (
    "status",
    "instances",
    "drain",
    "undrain",
    "policy",
    "mode",
    "cache-stats",
    "flush-cache",
    "shutdown",
    "elastic",
    "migrate",
)


class AdminRequest(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    token: str
    command: str
    args: list[str] = msgspec.field(default_factory=list)


class AdminReply(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    ok: bool
    result: Any = None  # plain data (dicts, lists, numbers, strings)
    error: str = ""
