"""`memserve gateway --config FILE`: run the gateway until SIGINT / SIGTERM or shutdown."""

from __future__ import annotations

from common.config import load_config
from common.service_main import Service, lock_process, run_main, run_service
from services.gateway.config import GatewayConfig, GatewaySettings
from services.gateway.service import build


def load(path: str | None) -> GatewayConfig:
    return load_config(GatewaySettings, path).gateway.validate()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    settings = load_config(GatewaySettings, config_path)
    cfg = settings.gateway.validate()
    lock_process(settings.cluster)  # every socket it makes is locked with this key

    async def start() -> tuple[Service, dict[str, str]]:
        service = build(cfg)
        return service, service.endpoints

    run_main(
        "gateway", cfg.log_level, run_service("gateway", cfg.instance_id, start, ready_address)
    )
