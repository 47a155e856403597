"""Gateway configuration: the `[gateway]` table (env: MEMSERVE_GATEWAY__KEY)."""

from __future__ import annotations

import msgspec

from common.config import SharedFile


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "gateway"
    address: str = "tcp://127.0.0.1:0"  # clients connect here (ROUTER, bound)
    reply_address: str = "tcp://127.0.0.1:0"  # workers push token chunks here (PULL, bound)
    advertise_host: str = ""  # the host workers connect to when reply_address binds 0.0.0.0
    scheduler: str = "tcp://127.0.0.1:5800"  # the scheduler's placement RPC
    scheduler_events: str = ""  # the scheduler's instance-event PUB ("" = not followed)
    control_address: str = "tcp://127.0.0.1:0"
    admin_token: str = ""  # the control socket refuses every command while this is empty
    model: str = "tiny"  # tokenizer and context length come from the model folder
    max_model_len: int | None = None  # None: the model's context length
    max_inflight: int = 256  # requests beyond this are refused as overloaded
    request_timeout_s: float = 30.0  # longest silence from the workers on one request
    place_timeout_s: float = 5.0
    session_ttl_s: float = 1800.0
    max_sessions: int = 10_000
    log_level: str = "info"

    def validate(self) -> GatewayConfig:
        """Raise ValueError naming the first bad key; return self when every key is valid."""
        for name in ("instance_id", "address", "reply_address", "scheduler", "model"):
            if not getattr(self, name):
                raise ValueError(f"gateway.{name} must not be empty")
        for name in ("max_inflight", "max_sessions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"gateway.{name} must be > 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "place_timeout_s", "session_ttl_s"):
            if not 0 < getattr(self, name) <= 86_400:
                raise ValueError(f"gateway.{name} must be in (0, 86400], got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"gateway.max_model_len must be >= 2, got {self.max_model_len}")
        return self


class GatewaySettings(SharedFile, forbid_unknown_fields=True):
    """Root of a gateway config file: a `[gateway]` table."""

    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)  # type: ignore[assignment]  # typed: this service's table
