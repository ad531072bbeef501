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
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

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


def execute_through_outages(
    pipeline: redis.client.Pipeline, what: str, log: logging.Logger
) -> tuple[list[Any], bool]:
    """Execute `pipeline`'s commands, again while Redis is away; (replies, whether a retry was
    needed). A failed attempt may have been applied, so every command must be safe to repeat,
    and a reply that was lost is lost: the caller learns it from the second value.

    redis-py empties a pipeline whether its execution succeeds or not; its command stack and
    scripts are kept here and put back before each attempt. redis-py would also ask Redis
    whether each of the pipeline's scripts is loaded, a round trip every time: here it asks
    only once per connection pool and script, and a script Redis has forgotten since (it
    restarted) is loaded and the whole pipeline sent again.
    """
    stack, scripts = list(pipeline.command_stack), set(pipeline.scripts)
    known = _LOADED_SCRIPTS.setdefault(pipeline.connection_pool, set())
    attempts = 0

    def attempt() -> list[Any]:
        nonlocal attempts
        attempts += 1
        pipeline.command_stack = list(stack)
        pipeline.scripts = {script for script in scripts if script.sha not in known}
        try:
            replies = pipeline.execute()
        except redis.exceptions.NoScriptError:  # the rest of the pipeline was applied
            attempts += 1
            known.clear()
            pipeline.command_stack = list(stack)
            pipeline.scripts = set(scripts)
            replies = pipeline.execute()
        known.update(script.sha for script in scripts)
        return replies

    replies = retry_through_outages(attempt, what, log)
    return replies, attempts > 1


# connection pool -> SHA1s of the scripts known to be loaded in its Redis
_LOADED_SCRIPTS: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
