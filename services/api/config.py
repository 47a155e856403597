"""The OpenAI-compatible HTTP API's configuration: the `[api]` table (env: MEMSERVE_API__KEY).

* `address`: where the HTTP server listens, `http://HOST:PORT` (port 0: any free port).
* `gateway`: the gateway's client address (ZeroMQ); `gateway_server_key` (Z85) and
  `gateway_client_key_file` as for `memserve chat` when the gateway speaks CURVE.
* `api_key`: the bearer token every /v1 request must carry (compared in constant time).
  Like the gateway's `client_curve`: `require_api_key = "auto"` requires one on any
  non-loopback address; `"off"` serves without one on purpose (e.g. behind an
  authenticating proxy); `"on"` requires one everywhere. Set it from the environment
  (MEMSERVE_API__API_KEY) or a 0600 file, never on a command line.
* Bounds: `max_body_bytes` (a larger body gets 413 unread), `max_tokens` (0: the model's
  context), `request_timeout_s` (the longest silence from the gateway on one request).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from common.config import SharedFile

_LOOPBACK_HOSTS = ("127.", "localhost", "::1")


class ApiConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instance_id: str = "api"
    address: str = "http://127.0.0.1:0"
    gateway: str = "tcp://127.0.0.1:5900"  # the gateway's client address
    gateway_server_key: str = ""  # Z85: the gateway's published CURVE key ("" = plain)
    gateway_client_key_file: str = ""  # this client's pair, for a gateway listing clients
    # Times a request that found the gateway gone before its first token is sent again
    # (once the gateway answers again, e.g. restarted by its supervisor).
    gateway_retries: int = 1
    model: str = "tiny"  # tokenizer, context length and chat template come from it
    served_model_name: str = ""  # the `model` clients name ("" = `model`)
    chat_template: str = ""  # a .jinja file or the template's text ("" = the model's own)
    api_key: str = ""
    require_api_key: str = "auto"  # auto | on | off
    max_body_bytes: int = 1 << 20
    max_tokens: int = 0  # the largest max_tokens a request may ask (0: the context)
    default_max_tokens: int = 256  # a completion's max_tokens when the request gives none
    request_timeout_s: float = 60.0
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.address)
        return parts.hostname or "127.0.0.1", parts.port or 0

    def validate(self) -> ApiConfig:
        """Raise ValueError naming the first bad key; return self when every key is valid."""
        for name in ("instance_id", "address", "gateway", "model"):
            if not getattr(self, name):
                raise ValueError(f"api.{name} must not be empty")
        parts = urlsplit(self.address)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"api.address must look like http://HOST:PORT, got {self.address!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"api.address has a bad port: {self.address!r}") from None
        if self.require_api_key not in ("auto", "on", "off"):
            raise ValueError(
                f"api.require_api_key must be auto|on|off, got {self.require_api_key!r}"
            )
        if self.needs_key and not self.api_key:
            raise ValueError(
                f"api.address {self.address} is not loopback, so requests need a bearer key: "
                'set api.api_key (e.g. MEMSERVE_API__API_KEY), or api.require_api_key = "off" '
                "to serve without one on purpose"
            )
        for name in ("max_body_bytes", "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"api.{name} must be > 0, got {getattr(self, name)}")
        if self.gateway_retries < 0:
            raise ValueError(f"api.gateway_retries must be >= 0, got {self.gateway_retries}")
        if self.max_tokens < 0:
            raise ValueError(f"api.max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 < self.request_timeout_s <= 86_400:
            raise ValueError(
                f"api.request_timeout_s must be in (0, 86400], got {self.request_timeout_s}"
            )
        return self

    @property
    def needs_key(self) -> bool:
        if self.require_api_key == "on":
            return True
        if self.require_api_key == "off":
            return False
        return not (self.host_port[0].startswith(_LOOPBACK_HOSTS))


class ApiSettings(SharedFile, forbid_unknown_fields=True):
    """Root of an API config file: an `[api]` table."""

    api: ApiConfig = msgspec.field(default_factory=ApiConfig)  # type: ignore[assignment]  # typed: this service's table
