"""Error types that cross service boundaries. Each carries a message meant for the user."""

from __future__ import annotations


class MemServeError(Exception):
    """Base class of the project's errors."""


class InvalidRequestError(MemServeError, ValueError):
    """A request the system will not run: bad sampling values, a prompt too long, ..."""
