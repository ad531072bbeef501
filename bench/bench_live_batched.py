"""Per-step overhead of the live batched KV worker: its wall time, sleeping vs working.

For each time scale in ``--scales`` a fresh `LocalCluster` of ``--workers`` real ``rq worker
-w workers.KVWorker`` processes with ``KVQ_ENGINE=batched`` (latency profile ``--latency``)
serves ``--num-requests`` requests of ``--workload`` (Poisson at ``--rate`` req/s of simulated
time, or as fast as possible with ``--rate 0``), sent by `run_live` with strategy
``--strategy``. The same requests are simulated (`simulate_run`, same engine) for reference.

Columns, from each worker's own accounting (`kvq:worker:<w>:info`, summed over workers):

- ``steps``: forward steps the workers emulated; ``wall s``: time inside their serving loops;
- ``sleep %``: share of that time asleep, emulating steps; ``work %`` the rest — RQ and
  Redis round trips, scheduling, results — and ``work ms/step`` = that time ÷ steps;
- ``RT/step``: Redis round trips per step (one at each boundary; admissions add two);
- ``late %``: steps that began after their nominal start (the boundary's work outlasted the
  previous step), which makes the live run slower than the model;
- ``TTFT``, ``e2e``: live mean ÷ simulated mean (1.00 = the live worker keeps the model's
  time); ``batch``: mean batch size, live (simulated).

Usage::

    python bench/bench_live_batched.py [--scales 1,0.1] [--workers 2] [--num-requests 64]
        [--workload shared-prefix-small] [--rate 8] [--latency seed] [--quick]

Redis: ``--redis-url`` (its db is flushed before each measurement and at the end), else a
redis-server of this process's own (`EmbeddedRedis`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import numpy as np
import redis
from bench_args import parse_args

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.request import Request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.live.cluster import LocalCluster
from kvqueue.live.embedded import EmbeddedRedis
from kvqueue.live.engine_log import read_engine_stats
from kvqueue.live.run import run_live
from kvqueue.report.engine_metrics import summarize_engines
from kvqueue.sim.simulation import simulate_run
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import make_workload

PREFIX = "kvqbench:"
QUICK = {"scales": "0.1", "num_requests": 16, "workload": "shared-prefix-tiny"}


@dataclass(frozen=True, slots=True)
class Row:
    scale: float
    workers: int
    completed: int
    steps: int
    wall_s: float
    sleep_s: float
    round_trips: int
    late_steps: int
    ttft_ratio: float
    e2e_ratio: float
    batch_live: float | None
    batch_sim: float | None


def build_requests(args: argparse.Namespace) -> list[Request]:
    requests = make_workload(args.workload, args.num_requests, seed=args.seed)
    if args.rate <= 0:
        return requests
    return retime(requests, "poisson", args.rate, args.seed)


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with EmbeddedRedis() as server:
        yield server.url


def measure(url: str, args: argparse.Namespace, scale: float, requests: list[Request]) -> Row:
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = {"KVQ_ENGINE": "batched", "KVQ_LATENCY": args.latency}
    settings = Settings(
        redis_url=url,
        key_prefix=PREFIX,
        strategy=args.strategy,
        time_scale=scale,
        engine="batched",
        latency_profile=args.latency,
    )
    with LocalCluster(url, args.workers, env=env, prefix=PREFIX) as cluster:
        run = run_live(client, settings, requests, progress=False, timeout_s=args.timeout)
        infos = [client.hgetall(keys.worker_info(w, PREFIX)) for w in cluster.workers]
        live_engine = summarize_engines(read_engine_stats(client, run.sent.run_id, PREFIX))
    client.flushdb()
    client.close()

    def total(field: str) -> float:
        return sum(float(info.get(field.encode(), 0)) for info in infos)

    simulated = simulate_run(
        requests,
        args.strategy,
        num_workers=args.workers,
        engine=EngineConfig("batched", args.latency),
    )
    sim_engine = summarize_engines(simulated.engine_stats)
    return Row(
        scale=scale,
        workers=args.workers,
        completed=sum(r.status is RequestStatus.COMPLETED for r in run.results),
        steps=int(total("steps")),
        wall_s=total("serving_wall_s"),
        sleep_s=total("serving_sleep_s"),
        round_trips=int(total("round_trips")),
        late_steps=int(total("late_steps")),
        ttft_ratio=_mean_ratio(run.results, simulated.results, "ttft_ms"),
        e2e_ratio=_mean_ratio(run.results, simulated.results, "e2e_ms"),
        batch_live=(live_engine or {}).get("mean_batch_size"),
        batch_sim=(sim_engine or {}).get("mean_batch_size"),
    )


def _mean_ratio(
    live: Sequence[RequestResult], simulated: Sequence[RequestResult], field: str
) -> float:
    def mean(results: Sequence[RequestResult]) -> float:
        done = [getattr(r, field) for r in results if r.status is RequestStatus.COMPLETED]
        return float(np.mean(done)) if done else float("nan")

    return mean(live) / mean(simulated)


def format_rows(rows: Sequence[Row]) -> str:
    header = (
        "scale", "W", "done", "steps", "wall s", "sleep %", "work %", "work ms/step",
        "RT/step", "late %", "TTFT", "e2e", "batch",
    )  # fmt: skip
    lines = []
    for r in rows:
        work = r.wall_s - r.sleep_s
        steps = max(r.steps, 1)
        batch = "-" if r.batch_live is None else f"{r.batch_live:.2f} ({r.batch_sim or 0:.2f})"
        row = (
            f"{r.scale:g}", str(r.workers), str(r.completed), f"{r.steps:,}",
            f"{r.wall_s:.2f}", f"{100 * r.sleep_s / r.wall_s:.1f}",
            f"{100 * work / r.wall_s:.1f}", f"{1000 * work / steps:.3f}",
            f"{r.round_trips / steps:.2f}", f"{100 * r.late_steps / steps:.1f}",
            f"{r.ttft_ratio:.3f}", f"{r.e2e_ratio:.3f}", batch,
        )  # fmt: skip
        lines.append(row)
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out.append("-" * len(out[0]))
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,0.1", help="time scales, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--workload", default="shared-prefix-small")
    parser.add_argument("--rate", type=float, default=8.0, help="req/s (simulated); 0 = asap")
    parser.add_argument("--latency", default="seed", choices=("seed", "calibrated"))
    parser.add_argument("--strategy", default="cache_aware")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--redis-url", help="a Redis whose db may be flushed")
    args = parse_args(parser, argv, QUICK)
    logging.basicConfig(level=logging.WARNING)
    requests = build_requests(args)
    rows = []
    with redis_url(args.redis_url) as url:
        for scale in (float(s) for s in args.scales.split(",")):
            rows.append(measure(url, args, scale, requests))
    print(
        f"{len(requests)} requests of {args.workload}"
        f"{f' at {args.rate:g} req/s' if args.rate > 0 else ' asap'}, {args.strategy}, "
        f"{args.workers} batched workers ({args.latency} profile)\n"
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
