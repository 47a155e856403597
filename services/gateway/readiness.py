"""Whether the cluster can serve, as the gateway knows it (pure): the answer to a client's
`Status`, built from the scheduler's last `GatewayKnown` and when it came.

The gateway asks nobody to answer: the scheduler's view arrives every `alive_interval_s`
anyway (the reply to `GatewayAlive`), so a `Status` costs one dict copy. A view older than
`STALE_INTERVALS` intervals counts as no view: the scheduler is not answering.
"""

from __future__ import annotations

from common.protocol import client as cp
from common.protocol import scheduler as sp

STALE_INTERVALS = 3


def status_report(
    known: sp.GatewayKnown | None, known_at: float, now: float, interval_s: float
) -> cp.StatusReport:
    if known is None:
        return cp.StatusReport(False, reason="the scheduler has not answered this gateway yet")
    if now - known_at > STALE_INTERVALS * max(interval_s, 1.0):
        return cp.StatusReport(
            False,
            instances=dict(known.instances),
            needs=list(known.needs),
            reason=f"the scheduler has not answered for {now - known_at:.1f} s",
        )
    missing = [role for role in known.needs if known.instances.get(role, 0) < 1]
    reason = f"no instance of role {', '.join(missing)} can take requests" if missing else ""
    return cp.StatusReport(
        not missing,
        scheduler_ok=True,
        instances=dict(known.instances),
        needs=list(known.needs),
        reason=reason,
    )
