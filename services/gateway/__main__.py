"""`memserve gateway --config FILE`: run the gateway until SIGINT / SIGTERM or shutdown."""

from __future__ import annotations

from common import security
from common.config import load_config
from common.service_main import Service, run_main, run_service
from services.gateway.config import GatewayConfig, GatewaySettings
from services.gateway.service import build


def load(path: str | None) -> GatewayConfig:
    return load_config(GatewaySettings, path).gateway.validate()


def load_with_key(path: str | None) -> GatewayConfig:
    """The service's table, after installing the cluster key the file or environment
    names (every socket the service makes is locked with it)."""
    settings = load_config(GatewaySettings, path)
    cfg = settings.gateway.validate()
    security.install(security.load_key(settings.cluster))
    return cfg


def main(config_path: str | None, ready_address: str | None = None) -> None:
    cfg = load_with_key(config_path)

    async def start() -> tuple[Service, dict[str, str]]:
        service = build(cfg)
        return service, service.endpoints

    run_main(
        "gateway", cfg.log_level, run_service("gateway", cfg.instance_id, start, ready_address)
    )
