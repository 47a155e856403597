"""setup_logging: JSON lines with service and pid; console mode for the CLI."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pytest
import structlog

from common.logging import get_logger, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_records_carry_service_and_pid(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("memserve.test")  # created before set-up, must still follow it
    setup_logging("gateway")
    log.info("request admitted", request_id="r1", tokens=12)
    log.debug("filtered out at info level")

    captured = capsys.readouterr()
    assert captured.out == ""
    [record] = json_lines(captured.err)
    assert record["event"] == "request admitted"
    assert record["service"] == "gateway"
    assert record["pid"] == os.getpid()
    assert record["level"] == "info"
    assert record["logger"] == "memserve.test"
    assert (record["request_id"], record["tokens"]) == ("r1", 12)
    assert isinstance(record["timestamp"], str)


def test_stdlib_records_share_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", level="debug")
    logging.getLogger("some.library").warning("disk at %d%%", 91)
    [record] = json_lines(capsys.readouterr().err)
    assert record["event"] == "disk at 91%"
    assert record["logger"] == "some.library"
    assert record["service"] == "worker"
    assert record["level"] == "warning"


def test_exceptions_are_structured(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker")
    try:
        raise RuntimeError("kv block lost")
    except RuntimeError:
        get_logger().exception("step failed")
    [record] = json_lines(capsys.readouterr().err)
    [exc] = record["exception"]  # type: ignore[misc]
    assert exc["exc_type"] == "RuntimeError"
    assert exc["exc_value"] == "kv block lost"


def test_setup_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("scheduler")
    setup_logging("scheduler")
    get_logger().warning("once")
    logging.getLogger("lib").warning("once too")
    records = json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records] == ["once", "once too"]


def test_console_mode_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("cli", json=False)
    get_logger().info("generating", tokens=48)
    err = capsys.readouterr().err
    assert "generating" in err
    assert "tokens=48" in err
    assert "service=cli" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        setup_logging("x", level="verbose")
