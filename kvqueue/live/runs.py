"""A run in Redis: its metadata hash and its results stream, one result per request.

A run's keys (`kvq:run:<id>`, `kvq:run:<id>:reported`, `kvq:results:<id>`) expire a TTL
(`KVQ_RUN_TTL`, a day by default) after the run's last result.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import orjson
import redis

from kvqueue import keys
from kvqueue.errors import RunIdInUseError
from kvqueue.gpu.results import RequestResult
from kvqueue.live import scripts

DEFAULT_RUN_TTL_S = 86_400.0
RESULTS_STREAM_MAXLEN = 1_000_000


def claim_run(
    client: redis.Redis,
    run_id: str,
    meta: dict[str, Any],
    prefix: str = keys.DEFAULT_PREFIX,
    ttl_s: float = DEFAULT_RUN_TTL_S,
) -> None:
    """Write a new run's metadata, or raise `RunIdInUseError` if the id is taken.

    Atomic (`CLAIM_RUN`): of two producers given the same `--run-id`, exactly one writes.
    The metadata expires `ttl_s` after its last result (see `ResultWriter`).
    """
    owner = f"{socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
    fields: list[Any] = []
    for name, value in meta.items():
        fields += [name, orjson.dumps(value)]
    taken = client.register_script(scripts.CLAIM_RUN)(
        keys=[keys.run(run_id, prefix), keys.results(run_id, prefix)],
        args=[orjson.dumps(owner), int(ttl_s * 1000), *fields],
    )
    if taken is not None:
        holder = taken.decode() if isinstance(taken, bytes) else str(taken)
        raise RunIdInUseError(
            f"run id {run_id!r} is already in use under prefix {prefix!r} (by {holder}); "
            "choose another --run-id, or leave it out for a fresh one"
        )


def read_run_meta(
    client: redis.Redis, run_id: str, prefix: str = keys.DEFAULT_PREFIX
) -> dict[str, Any]:
    raw = client.hgetall(keys.run(run_id, prefix))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


class ResultWriter:
    """Appends results to their run's stream; the first result of a request wins.

    Everyone who ends a request — its worker, a reaper that saw the worker die, the producer
    at its timeout — writes through `APPEND_RESULT`, so a run's stream holds at most one
    result per request whatever the races. Each append renews the run's TTL.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = keys.DEFAULT_PREFIX,
        run_ttl_s: float = DEFAULT_RUN_TTL_S,
    ) -> None:
        self.prefix = prefix
        self.run_ttl_ms = int(run_ttl_s * 1000)
        self._append = client.register_script(scripts.APPEND_RESULT)

    def append(self, result: RequestResult, pipeline: Any = None) -> bool | None:
        """Append `result` unless its request has one; True if appended (None on a pipeline)."""
        run_id = result.run_id
        appended = self._append(
            keys=[
                keys.results(run_id, self.prefix),
                keys.run_reported(run_id, self.prefix),
                keys.run(run_id, self.prefix),
            ],
            args=[
                result.request_id,
                orjson.dumps(result.to_dict()),
                RESULTS_STREAM_MAXLEN,
                self.run_ttl_ms,
            ],
            client=pipeline,
        )
        return None if pipeline is not None else bool(appended)

    def reported(self, run_id: str, request_ids: list[str], pipeline: Any = None) -> Any:
        """Which of `request_ids` already have a result (SMISMEMBER)."""
        key = keys.run_reported(run_id, self.prefix)
        return (pipeline or self._append.registered_client).smismember(key, request_ids)


def read_results(
    client: redis.Redis, run_id: str, prefix: str = keys.DEFAULT_PREFIX, after: str = "-"
) -> tuple[list[RequestResult], str]:
    """Results appended after stream id `after` (exclusive, '-' for all) and the last id seen."""
    stream = keys.results(run_id, prefix)
    start = after if after == "-" else f"({after}"
    entries = client.xrange(stream, min=start, max="+")
    results = [RequestResult.from_dict(orjson.loads(fields[b"result"])) for _, fields in entries]
    last = entries[-1][0].decode() if entries else after
    return results, last
