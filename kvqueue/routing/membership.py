"""Who is live, in which generation, and what each worker owes: membership in Redis.

A worker process *registers* its name and gets a new generation (`kvq:worker:<w>:generation`);
it heartbeats into `kvq:workers` (score = Redis server time) while that generation is current.
A worker whose heartbeat is older than the TTL is dead for routing at once (`ROUTE_VIEW` only
sees fresh heartbeats), and the first process that `reap`s it claims its death, once: the
worker leaves the live set and the tree, its load goes to zero, and its outstanding jobs are
handed to the caller (`kvqueue.live.recovery` reroutes or fails them).

Every routed job has a load record in its worker's jobs hash (see `worker_scripts`): the
counters the router reads are the sum of the current generation's records, a record is
released at most once, and a new generation recounts what is still queued. Hence a process
that is superseded, declared dead, or talking to a Redis that lost everything can never move
another generation's counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson
import redis

from kvqueue import keys
from kvqueue.routing import worker_scripts


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What a routed job adds to its worker's load until it ends, and whose request it is."""

    run_id: str
    request_id: str
    strategy: str
    tokens: int
    work_ms: float
    generation: int = 0
    started: bool = False

    def to_json(self) -> bytes:
        """The record as `RECORD_JOB` and `START_JOB` take it (generation and state are theirs)."""
        return orjson.dumps(
            {
                "run": self.run_id,
                "req": self.request_id,
                "strategy": self.strategy,
                "tokens": self.tokens,
                "work": self.work_ms,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobRecord:
        data = orjson.loads(raw)
        return cls(
            run_id=str(data["run"]),
            request_id=str(data["req"]),
            strategy=str(data.get("strategy", "")),
            tokens=int(data.get("tokens", 0)),
            work_ms=float(data.get("work", 0.0)),
            generation=int(data.get("gen", 0)),
            started=bool(data.get("started", 0)),
        )


class HeartbeatStatus(str, Enum):
    OK = "ok"
    LOST = "lost"  # Redis lost the registration (restarted empty, flushed)
    SUPERSEDED = "superseded"  # a newer process registered the same name
    REAPED = "reaped"  # declared dead (heartbeat expired) and claimed by a reaper


class StartStatus(str, Enum):
    COUNTED = "counted"
    ADOPTED = "adopted"  # had no record for this generation; counted now
    LOST = "lost"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Registration:
    """A new generation; `orphans` are the jobs an earlier process of the name had started."""

    generation: int
    orphans: dict[str, JobRecord] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reaped:
    """A claimed death: the generation that died and the jobs it still owed, by job id."""

    worker: str
    generation: int
    jobs: dict[str, JobRecord]


class RedisMembership:
    """Registration, heartbeats and reaping of workers under one key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = keys.DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._register = client.register_script(worker_scripts.REGISTER)
        self._heartbeat = client.register_script(worker_scripts.HEARTBEAT)
        self._start_job = client.register_script(worker_scripts.START_JOB)
        self._live = client.register_script(worker_scripts.LIVE_WORKERS)
        self._reap = client.register_script(worker_scripts.REAP)

    def register(self, worker: str, capacity_blocks: int) -> Registration:
        p = self.prefix
        generation, started = self._register(
            keys=[
                keys.worker_generation(worker, p),
                keys.workers(p),
                keys.worker_jobs(worker, p),
                keys.load(p),
                keys.load_tokens(p),
                keys.load_work(p),
                keys.load_since(p),
                keys.capacity(p),
                keys.usage(p),
                keys.engine_signals(p),
            ],
            args=[worker, capacity_blocks, time.time() * 1000.0],
        )
        return Registration(int(generation), _records(started))

    def heartbeat(self, worker: str, generation: int) -> HeartbeatStatus:
        status = self._heartbeat(
            keys=[keys.worker_generation(worker, self.prefix), keys.workers(self.prefix)],
            args=[worker, generation],
        )
        return HeartbeatStatus(_text(status))

    def start_job(
        self, worker: str, generation: int, job_id: str, fallback: JobRecord, pipeline: Any = None
    ) -> StartStatus | None:
        """Mark a job started by `generation` (see `START_JOB`); None when pipelined."""
        reply = self._start_job(
            keys=ledger_keys(worker, self.prefix),
            args=[worker, job_id, generation, fallback.to_json()],
            client=pipeline or self.client,
        )
        return None if pipeline is not None else StartStatus(_text(reply))

    def live_workers(self, heartbeat_ttl_s: float) -> list[str]:
        """Workers whose last heartbeat is within the TTL (Redis server time)."""
        return self._members(heartbeat_ttl_s, live=True)

    def expired_workers(self, heartbeat_ttl_s: float) -> list[str]:
        """Workers still in the live set whose last heartbeat is older than the TTL."""
        return self._members(heartbeat_ttl_s, live=False)

    def _members(self, heartbeat_ttl_s: float, live: bool) -> list[str]:
        members = self._live(
            keys=[keys.workers(self.prefix)],
            args=[int(heartbeat_ttl_s * 1000), "1" if live else "0"],
        )
        return [_text(m) for m in members]

    def reap(
        self, worker: str, heartbeat_ttl_s: float, generation: int | None = None
    ) -> Reaped | None:
        """Claim `worker`'s death if its heartbeat expired (or, given `generation`, if that
        generation is still current: a stopping worker hands itself over). None if there is
        nothing to claim: alive, or already claimed by someone else."""
        p = self.prefix
        reply = self._reap(
            keys=[
                keys.workers(p),
                keys.worker_generation(worker, p),
                keys.worker_jobs(worker, p),
                keys.slots(p),
                keys.slots_pending(p),
                keys.load(p),
                keys.load_tokens(p),
                keys.load_work(p),
                keys.load_since(p),
                keys.usage(p),
                keys.worker_routed(worker, p),
                keys.engine_signals(p),
            ],
            args=[p, worker, int(heartbeat_ttl_s * 1000), "" if generation is None else generation],
        )
        if reply is None:
            return None
        died, jobs = reply
        return Reaped(worker, int(died), _records(jobs))


def ledger_keys(worker: str, prefix: str) -> list[str]:
    """A worker's generation, its jobs hash and the three load counters: the first KEYS of
    `START_JOB` and `RELEASE_JOB`, in that order."""
    return [
        keys.worker_generation(worker, prefix),
        keys.worker_jobs(worker, prefix),
        keys.load(prefix),
        keys.load_tokens(prefix),
        keys.load_work(prefix),
    ]


def _records(flat: list[Any]) -> dict[str, JobRecord]:
    return {_text(flat[i]): JobRecord.from_json(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
