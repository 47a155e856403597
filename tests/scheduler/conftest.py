"""The scheduler service fixture (`harness`) for every test in this folder."""

from tests.scheduler.harness import harness  # noqa: F401
