"""`memserve scheduler --config FILE`: run the global scheduler until SIGINT / SIGTERM or an
admin `shutdown`."""

from __future__ import annotations

from common import security
from common.config import load_config
from common.service_main import Service, run_main, run_service
from services.scheduler.config import SchedulerConfig, SchedulerSettings
from services.scheduler.service import SchedulerService


def load(path: str | None) -> SchedulerConfig:
    return load_config(SchedulerSettings, path).scheduler.validate()


def load_with_key(path: str | None) -> SchedulerConfig:
    """The service's table, after installing the cluster key the file or environment
    names (every socket the service makes is locked with it)."""
    settings = load_config(SchedulerSettings, path)
    cfg = settings.scheduler.validate()
    security.install(security.load_key(settings.cluster))
    return cfg


def main(config_path: str | None, ready_address: str | None = None) -> None:
    cfg = load_with_key(config_path)

    async def start() -> tuple[Service, dict[str, str]]:
        service = SchedulerService(cfg)
        return service, service.endpoints()

    run_main(
        "scheduler", cfg.log_level, run_service("scheduler", cfg.instance_id, start, ready_address)
    )
