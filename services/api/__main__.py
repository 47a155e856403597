"""`memserve api --config FILE`: run the OpenAI-compatible HTTP API until SIGINT / SIGTERM."""

from __future__ import annotations

from common.config import load_config
from common.service_main import Service, lock_process, run_main, run_service
from services.api.config import ApiConfig, ApiSettings
from services.api.service import build


def load(path: str | None) -> ApiConfig:
    return load_config(ApiSettings, path).api.validate()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    settings = load_config(ApiSettings, config_path)
    cfg = settings.api.validate()
    # The readiness handshake with the launcher is a cluster socket (the gateway's client
    # socket is not: it is plain on loopback, or locked with the gateway's own key).
    lock_process(settings.cluster)

    async def start() -> tuple[Service, dict[str, str]]:
        service = build(cfg)
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
        return service, service.endpoints

    run_main("api", cfg.log_level, run_service("api", cfg.instance_id, start, ready_address))
