"""Riding out a Redis outage: retry an operation with capped exponential backoff.

Workers use it for everything they owe Redis (results, cache events, heartbeats): each such
operation is idempotent (a result's first append wins, a load record is released once, tree
updates are set operations), so repeating one whose reply was lost is harmless. The backoff
is redis-py's `ExponentialBackoff`: 0.1 s, doubling, at most `RETRY_CAP_S` between attempts,
for as long as Redis stays away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff

RETRY_BASE_S = 0.1
RETRY_CAP_S = 5.0
# Redis is away (refused, reset, timed out, still loading its data after a restart).
REDIS_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)

T = TypeVar("T")


class Stopped(Exception):
    """The retry loop was asked to stop while Redis was away."""


def retry_through_outages(
    operation: Callable[[], T],
    what: str,
    log: logging.Logger,
    stop: threading.Event | None = None,
) -> T:
    """`operation()`, retried while Redis is away; raises `Stopped` if `stop` gets set."""
    backoff = ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S)
    failures = 0
    while True:
        try:
            result = operation()
        except REDIS_OUTAGE_ERRORS as exc:
            if failures == 0:
                log.warning(
                    "%s: Redis is unreachable (%s); retrying, backoff up to %g s",
                    what,
                    exc,
                    RETRY_CAP_S,
                )
            delay = backoff.compute(failures)
            failures += 1
            if stop is not None:
                if stop.wait(delay):
                    raise Stopped(what) from exc
            else:
                time.sleep(delay)
            continue
        if failures:
            log.warning("%s: Redis answered again after %d attempts", what, failures + 1)
        return result
