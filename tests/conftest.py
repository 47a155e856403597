"""Suite-wide fixtures and settings: tests marked `gpu` run only where CUDA is available;
`tiny_folder` and `make_engine` give any test an engine on the embedded tiny model (the
worker tests and the GPU prefill/decode test in tests/mempool both use them)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common import security
from common.model.presets import materialize
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import MakeEngine


def pytest_configure(config: pytest.Config) -> None:
    """Every test process is a cluster member: it makes a key file, installs the key for
    its own sockets, and names the file in MEMSERVE_CLUSTER__KEY_FILE, which every service
    process it starts inherits. Each xdist worker makes its own."""
    folder = Path(tempfile.mkdtemp(prefix="memserve-key-"))
    key_file = folder / "cluster.key"
    security.install(security.write_key_file(key_file))
    os.environ["MEMSERVE_CLUSTER__KEY_FILE"] = str(key_file)
    os.environ.pop("MEMSERVE_CLUSTER__SECRET_KEY", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs on GPU machines (`make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    return materialize("tiny")


@pytest.fixture
def make_engine(tiny_folder: Path) -> Iterator[MakeEngine]:
    """Builds engines on the tiny model; each one still idle at teardown must pass
    `check_integrity`."""
    engines: list[Engine] = []

    def make(**overrides: object) -> Engine:
        cfg = EngineConfig(model=str(tiny_folder), **overrides)  # type: ignore[arg-type]
        engine = Engine.from_config(cfg)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        if not e.has_unfinished():
            e.check_integrity()


# Real MemPool daemon processes, for any test that needs one.
from tests.daemons import launcher, spawn_daemon, spawn_worker  # noqa: E402, F401
