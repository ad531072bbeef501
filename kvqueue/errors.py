"""Domain errors. Every message names the offending value."""

from __future__ import annotations


class KVQueueError(Exception):
    """Base class of kvqueue's own errors."""


class ConfigError(KVQueueError, ValueError):
    """A configuration value is out of range or unknown."""


class RequestRejected(KVQueueError, ValueError):
    """A request can never be served by the configured simulated GPU.

    `reason` is the human-readable explanation that ends up in the request's result.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CacheFullError(KVQueueError, RuntimeError):
    """No free or evictable slot is left: every cached block is in use by a running request."""


class NoLiveWorkersError(KVQueueError, RuntimeError):
    """The router found no worker with a fresh heartbeat."""


class InputFormatError(KVQueueError, ValueError):
    """A prompts or trace file is malformed; the message names the file and line."""


class RunIdInUseError(KVQueueError, ValueError):
    """A run id is already taken in Redis (another producer's run, or an earlier one)."""


class AccessDeniedError(KVQueueError, PermissionError):
    """The Redis user may not run something kvqueue needs (an ACL refusal, named)."""
