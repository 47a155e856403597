"""`memserve scheduler --config FILE`: run the global scheduler until SIGINT / SIGTERM or an
admin `shutdown`."""

from __future__ import annotations

from common.config import load_config
from common.service_main import Service, lock_process, run_main, run_service
from services.scheduler.config import SchedulerConfig, SchedulerSettings
from services.scheduler.service import SchedulerService


def load(path: str | None) -> SchedulerConfig:
    return load_config(SchedulerSettings, path).scheduler.validate()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    settings = load_config(SchedulerSettings, config_path)
    cfg = settings.scheduler.validate()
    lock_process(settings.cluster)  # every socket it makes is locked with this key

    async def start() -> tuple[Service, dict[str, str]]:
        service = SchedulerService(cfg)
        return service, service.endpoints()

    run_main(
        "scheduler", cfg.log_level, run_service("scheduler", cfg.instance_id, start, ready_address)
    )
