"""Send a workload through the live pipeline: tokenize, hash, route, enqueue on worker-<i>.

    python producer/send.py --workload shared-prefix-small --strategy cache_aware --wait --json

Redis comes from REDIS_URL; every other setting from the environment (see the README) or flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvqueue.config import Settings
from kvqueue.errors import KVQueueError
from kvqueue.live.connection import connect
from kvqueue.live.producer import Producer
from kvqueue.live.run import fit_warning, run_live
from kvqueue.report.run_summary import format_summary, run_summary
from kvqueue.routing.policies.base import policy_names
from kvqueue.workloads.options import add_workload_arguments, build_requests
from kvqueue.workloads.recorded import workload_args_meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, default="shared-prefix-small")
    parser.add_argument("--strategy", help=f"routing strategy: {', '.join(policy_names())}")
    parser.add_argument("--run-id", help="name of this run (default: a timestamp)")
    parser.add_argument("--time-scale", type=float, help="wall seconds per simulated second")
    parser.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    parser.add_argument("--wait", action="store_true", help="wait for every result, summarize")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (--wait)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(
            strategy=args.strategy, time_scale=args.time_scale, tokenizer=args.tokenizer
        )
        requests, meta = build_requests(args, settings.hash_seed, settings.tokenizer)
        meta["workload_args"] = workload_args_meta(args)  # absolute paths: rebuildable later
        client = connect(settings.redis_url)
        workers = Producer(client, settings).require_workers()
        warning = fit_warning(client, settings, requests, workers)
        if warning:
            print(f"send.py: {warning}", file=sys.stderr)
        run = run_live(
            client, settings, requests, settings.strategy, args.run_id, args.wait, meta,
            progress=not args.json, timeout_s=args.timeout,
        )  # fmt: skip
    except (KVQueueError, ValueError) as exc:
        print(f"send.py: {exc}", file=sys.stderr)
        return 2
    if not args.wait:
        print(f"run {run.sent.run_id}: sent {len(run.sent.job_ids)} requests")
        return 0
    summary = run_summary(run)
    print(orjson.dumps(summary).decode() if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
