"""Suite-wide settings: tests marked `gpu` run only where CUDA is available."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs on GPU machines (make unit there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Real MemPool daemon processes, for any test that needs one.
from tests.daemons import launcher, spawn_daemon, spawn_worker  # noqa: E402, F401
