"""One SUB socket for every daemon's KV events: the scheduler connects it to each registered
instance's events address, however many there are.

    daemon A ──PUB──┐
    daemon B ──PUB──┼──▶ one SUB (KvEventFeed) ──▶ batches, each naming its `events_address`
    daemon C ──PUB──┘

ZeroMQ caps the sockets of a context (1,023 by default), not the connections of one socket,
so the scheduler holds one socket however many instances register. A SUB socket does not
say which publisher a message came from: batches are attributed by the address they name
(common/protocol/kv_events.py).

Invariants: the socket is connected to an address iff `follow` was called for it more
often than `unfollow` (workers that share a daemon share its connection, so no batch
arrives twice); `connections` counts those addresses.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter

import zmq

from common.protocol import kv_events as ev
from common.security import CLUSTER_CLIENT
from common.sockets import SubSocket

_feeds = itertools.count()


class KvEventFeed(SubSocket[ev.KvEventBatch]):
    def __init__(self) -> None:
        # A SUB socket is bound or connected at birth: bind it where nobody publishes.
        # It only connects out, to daemons' PUB sockets (CURVE servers): a CURVE client.
        super().__init__(
            f"inproc://scheduler-kv-feed-{next(_feeds)}",
            ev.KvEventBatch,
            bind=True,
            security=CLUSTER_CLIENT,
        )
        self._followed: Counter[str] = Counter()

    @property
    def connections(self) -> int:
        return len(self._followed)

    def follow(self, address: str) -> None:
        """Take `address`'s batches too; OSError when it is no ZeroMQ endpoint."""
        if not self._followed[address]:
            try:
                self._sock.connect(address)
            except zmq.ZMQError as e:
                del self._followed[address]
                raise OSError(e.errno, f"cannot connect {address}: {e.strerror}") from None
        self._followed[address] += 1

    def unfollow(self, address: str) -> None:
        self._followed[address] -= 1
        if self._followed[address] > 0:
            return
        del self._followed[address]
        if not self.closed:
            with contextlib.suppress(zmq.ZMQError):  # never connected: nothing to undo
                self._sock.disconnect(address)
