"""What a live worker's engine did in each run: recorded by the worker, read for dashboards.

A batched KV worker records an `EngineStats` per run, as the simulator's driver does, in the
run's own clock (simulated ms since the run started: wall seconds since the producer's
``run_started_at`` ÷ the run's time scale). A step holding requests of several runs counts in
each of them. Whenever a request of the run ends, in the same round trip as its result, the
worker appends what it recorded since its last report to the run's list
(`kvq:run:<id>:engine`): one JSON part ``{"worker", "stats": EngineStats.to_wire()}``. So
once every result of a run is in, so are its engine figures. The list expires with the run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import redis

from kvqueue import keys
from kvqueue.gpu.engine_stats import EngineStats
from kvqueue.live.runs import DEFAULT_RUN_TTL_S


class EngineLog:
    """A worker's unreported engine stats, per run id."""

    def __init__(
        self, worker: str, prefix: str = keys.DEFAULT_PREFIX, run_ttl_s: float = DEFAULT_RUN_TTL_S
    ) -> None:
        self.worker = worker
        self.prefix = prefix
        self.run_ttl_ms = int(run_ttl_s * 1000)
        self._runs: dict[str, EngineStats] = {}

    def stats(self, run_id: str) -> EngineStats:
        """The stats of `run_id` recorded since its last report (to record into)."""
        stats = self._runs.get(run_id)
        if stats is None:
            stats = self._runs[run_id] = EngineStats()
        return stats

    def report(self, run_ids: Any, pipeline: Any) -> None:
        """Append each run's unreported part to its list, on `pipeline`, and start afresh."""
        for run_id in run_ids:
            stats = self._runs.pop(run_id, None)
            if stats is None or stats.is_empty:
                continue
            key = keys.run_engine(run_id, self.prefix)
            part = orjson.dumps({"worker": self.worker, "stats": stats.to_wire()})
            pipeline.rpush(key, part)
            pipeline.pexpire(key, self.run_ttl_ms)


def read_engine_stats(
    client: redis.Redis, run_id: str, prefix: str = keys.DEFAULT_PREFIX
) -> dict[str, EngineStats]:
    """Each worker's `EngineStats` of the run, merged from its parts; {} when none recorded
    (a run of sequential workers, or of a version that did not record them)."""
    parts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for raw in client.lrange(keys.run_engine(run_id, prefix), 0, -1):
        part = orjson.loads(raw)
        parts[str(part["worker"])].append(part["stats"])
    return {worker: EngineStats.merge(found) for worker, found in sorted(parts.items())}
