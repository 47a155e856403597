"""Gateway configuration: the `[gateway]` table (env: MEMSERVE_GATEWAY__KEY).

Bounds on client input (each refusal is an error `Final` or `SessionClosed` to that client
alone; the gateway keeps serving the others):

* `max_id_bytes`: the longest `request_id` / `session_id` (UTF-8 bytes) a client may send;
  ids are echoed in every chunk, so an unbounded one multiplies the gateway's memory.
* `max_prompt_bytes`: the longest prompt text (UTF-8 bytes), judged before tokenizing.
  0 derives it from the context: `PROMPT_BYTES_PER_TOKEN` bytes per token of
  `max_model_len`, plus `PROMPT_BYTES_SLACK`.
* `max_inflight` (all clients) and `max_inflight_per_client` (one ZeroMQ identity):
  requests beyond either are refused as overloaded.
* `max_sessions` (all clients) and `max_sessions_per_client`: a client at its own cap
  evicts its own least recently used idle session; at the total cap the globally least
  recently used idle session is evicted. A client never locks out another.
* `max_tokens` of a request may not exceed the context (`max_model_len`).
* `log_burst` warning lines per kind of malformed or refused message per
  `log_interval_s`; the rest are counted in one "suppressed" line.
"""

from __future__ import annotations

import msgspec

from common.config import SharedFile
from common.metrics import check_address

# A token of a real BPE vocabulary averages about 4 bytes of English; twice that leaves room
# for long tokens (runs of spaces, code) while still bounding what the tokenizer is given.
PROMPT_BYTES_PER_TOKEN = 8
PROMPT_BYTES_SLACK = 1024


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "gateway"
    address: str = "tcp://127.0.0.1:0"  # clients connect here (ROUTER, bound)
    reply_address: str = "tcp://127.0.0.1:0"  # workers push token chunks here (PULL, bound)
    advertise_host: str = ""  # the host workers connect to when reply_address binds 0.0.0.0
    scheduler: str = "tcp://127.0.0.1:5800"  # the scheduler's placement RPC
    scheduler_events: str = ""  # the scheduler's instance-event PUB ("" = not followed)
    control_address: str = "tcp://127.0.0.1:0"
    # Prometheus /metrics over HTTP (common/metrics.py): host:port, "" = off. Loopback by
    # default; elsewhere it exposes counts only (no prompts, no ids, no secrets).
    metrics_address: str = "127.0.0.1:0"
    # The client socket's lock (services/gateway/public.py): auto | on | off.
    client_curve: str = "auto"
    client_key_file: str = ""  # the gateway's own CURVE pair for clients (not the cluster key)
    allowed_client_keys: list[str] = msgspec.field(default_factory=list)  # Z85; empty: any
    admin_token: str = ""  # the control socket refuses every command while this is empty
    model: str = "tiny"  # tokenizer and context length come from the model folder
    max_model_len: int | None = None  # None: the model's context length
    max_inflight: int = 256  # requests beyond this are refused as overloaded
    max_inflight_per_client: int = 64  # the same, for one client (ZeroMQ identity)
    max_id_bytes: int = 128  # longest request_id / session_id
    max_prompt_bytes: int = 0  # longest prompt text; 0: derived from max_model_len
    request_timeout_s: float = 30.0  # longest silence from the workers on one request
    place_timeout_s: float = 5.0
    # Times a request whose instance died before its first token is placed again.
    replace_attempts: int = 2
    alive_interval_s: float = 1.0  # GatewayAlive to the scheduler (it drops a dead one's charges)
    session_ttl_s: float = 1800.0
    max_sessions: int = 10_000
    max_sessions_per_client: int = 256
    log_burst: int = 5  # warning lines per kind per log_interval_s
    log_interval_s: float = 10.0
    log_level: str = "info"

    def validate(self) -> GatewayConfig:
        """Raise ValueError naming the first bad key; return self when every key is valid."""
        for name in ("instance_id", "address", "reply_address", "scheduler", "model"):
            if not getattr(self, name):
                raise ValueError(f"gateway.{name} must not be empty")
        positive = (
            *("max_inflight", "max_inflight_per_client", "max_sessions"),
            *("max_sessions_per_client", "max_id_bytes", "log_burst"),
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"gateway.{name} must be > 0, got {getattr(self, name)}")
        check_address("gateway.metrics_address", self.metrics_address)
        if self.client_curve not in ("auto", "on", "off"):
            raise ValueError(f"gateway.client_curve must be auto|on|off, got {self.client_curve!r}")
        if self.replace_attempts < 0:
            raise ValueError(f"gateway.replace_attempts must be >= 0, got {self.replace_attempts}")
        if self.max_prompt_bytes < 0:
            raise ValueError(f"gateway.max_prompt_bytes must be >= 0, got {self.max_prompt_bytes}")
        for name in (
            *("request_timeout_s", "place_timeout_s", "session_ttl_s"),
            *("log_interval_s", "alive_interval_s"),
        ):
            if not 0 < getattr(self, name) <= 86_400:
                raise ValueError(f"gateway.{name} must be in (0, 86400], got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"gateway.max_model_len must be >= 2, got {self.max_model_len}")
        return self

    def prompt_bytes_limit(self, max_model_len: int) -> int:
        """The longest prompt text in bytes: `max_prompt_bytes`, or derived from the context."""
        if self.max_prompt_bytes:
            return self.max_prompt_bytes
        return PROMPT_BYTES_PER_TOKEN * max_model_len + PROMPT_BYTES_SLACK


class GatewaySettings(SharedFile, forbid_unknown_fields=True):
    """Root of a gateway config file: a `[gateway]` table."""

    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)  # type: ignore[assignment]  # typed: this service's table
