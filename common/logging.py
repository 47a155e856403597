"""structlog set-up shared by every MemServe process.

Services log JSON lines to stderr (one object per line, machine-parsed by the launcher and
log shippers); the CLI logs with structlog's readable console renderer. Every record
carries ``service`` and ``pid``, the two things needed to tell interleaved process output
apart. Records from the standard ``logging`` module (libraries, asyncio) go through the same
renderer, so stderr holds one format only.

``setup_logging`` may be called again: the last call wins, nothing is installed twice.
Loggers from ``get_logger`` resolve the configuration on every call rather than caching
it, so module-level loggers created before ``setup_logging`` follow it too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at write time (test capture replaces it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _Stderr()  # one object, so structlog's per-file write lock is one lock


class _NamedLogger(structlog.PrintLogger):
    """A PrintLogger to stderr that knows the name ``get_logger`` was given."""

    def __init__(self, name: str | None) -> None:
        super().__init__(file=cast(Any, _STDERR))
        self.name = name


def _logger_factory(*args: Any) -> _NamedLogger:
    return _NamedLogger(args[0] if args else None)


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


class _StdlibHandler(logging.StreamHandler):
    """Marks the one root handler this module owns, so set-up can replace it."""


def setup_logging(service: str, *, json: bool = True, level: str = "info") -> None:
    """Configure structlog and the stdlib root logger for this process."""
    try:
        threshold = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}") from None

    def add_origin(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict["service"] = service
        # Read per record: a forked child must not log its parent's pid.
        event_dict["pid"] = os.getpid()
        return event_dict

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_origin,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if json:
        # Structured tracebacks without local variables: locals bloat every error line
        # and can hold request payloads.
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        shared.append(structlog.processors.ExceptionRenderer(transformer))
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[_add_logger_name, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    handler = _StdlibHandler(cast(Any, _STDERR))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root.addHandler(handler)
    root.setLevel(threshold)


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; ``name`` (usually ``__name__``) is bound as ``logger``."""
    # The name travels as a logger-factory argument: binding it as a context value would
    # resolve the configuration now instead of at each call.
    args = () if name is None else (name,)
    return cast(FilteringBoundLogger, structlog.get_logger(*args))


class Throttled:
    """Warnings at most `burst` per key per `interval_s`, so a peer that floods bad input
    cannot flood the log: past the burst, lines are counted, and the first line of the
    next interval is preceded by one "suppressed K similar" line for that key.

    Keys must come from a small fixed set (a kind of message, never a peer's id): the
    table holds one entry per key for the life of the process."""

    def __init__(
        self,
        logger: FilteringBoundLogger,
        *,
        burst: int = 5,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        # key -> [window start, lines written in the window, lines suppressed]
        self._windows: dict[str, list[float]] = {}

    def warning(self, key: str, event: str, **fields: Any) -> bool:
        """Log `event` unless `key` is over its burst; return whether it was written."""
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval_s:
            if w is not None and w[2]:
                self.logger.warning("suppressed similar warnings", key=key, suppressed=int(w[2]))
            w = self._windows[key] = [now, 0, 0]
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        self.logger.warning(event, **fields)
        return True
