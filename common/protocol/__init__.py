"""Wire types, one module per channel, each saying who sends to whom.

* ``ready`` - service process -> launcher: ``Ready`` / ``Failed`` at start-up.
* ``mempool`` - worker, peer daemons, scheduler, admin -> MemPool daemon: RPC.
* ``kv_events`` - MemPool daemon -> global scheduler: stored / removed blocks (PUB/SUB).
"""
