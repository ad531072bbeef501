"""Send a workload through the live pipeline: tokenize, hash, route, enqueue on worker-<i>.

    python producer/send.py --workload shared-prefix-small --strategy cache_aware --wait --json

Redis comes from REDIS_URL; every other setting from the environment (see the README) or flags.
Exit status: 0 when every request was sent (and, with --wait, has a result and none failed);
1 when, with --wait, any request failed (a dead worker, a timeout, ...); 2 for bad input,
configuration or Redis rights, with nothing sent; 3 when Redis was lost mid-run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvqueue.config import Settings
from kvqueue.errors import KVQueueError
from kvqueue.live.connection import check_access, connect, redact, scrub
from kvqueue.live.producer import Producer, new_run_id
from kvqueue.live.run import fit_warning, run_live
from kvqueue.report.run_summary import format_summary, run_summary
from kvqueue.routing.approximate import INDEX_MODES
from kvqueue.routing.policies.base import policy_names
from kvqueue.workloads.options import add_workload_arguments, build_requests
from kvqueue.workloads.recorded import workload_args_meta

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_REDIS_LOST = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, default="shared-prefix-small")
    parser.add_argument(
        "--strategy",
        help=f"routing strategy, NAME or NAME:INDEX: {', '.join(policy_names())}",
    )
    parser.add_argument(
        "--index",
        choices=INDEX_MODES,
        help="prefix index the router reads: precise (the workers' cache events) or "
        "approximate (what it routed); default: the policy's upstream's (env KVQ_INDEX)",
    )
    parser.add_argument("--run-id", help="name of this run (default: a timestamp)")
    parser.add_argument("--time-scale", type=float, help="wall seconds per simulated second")
    parser.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    parser.add_argument(
        "--max-outstanding",
        type=int,
        help="wait while the chosen worker has this many requests outstanding (default: never)",
    )
    parser.add_argument(
        "--reset-caches",
        action="store_true",
        help="every worker empties its KV cache first (announced as `cleared`); without it a "
        "run that starts on warm caches is warned about",
    )
    parser.add_argument("--wait", action="store_true", help="wait for every result, summarize")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (--wait)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="send.py: %(message)s", level=logging.WARNING)
    run_id = args.run_id or new_run_id()
    url = ""
    try:
        settings = Settings.from_env(
            strategy=args.strategy,
            time_scale=args.time_scale,
            tokenizer=args.tokenizer,
            max_outstanding=args.max_outstanding,
            index_mode=args.index,
        )
        url = settings.redis_url
        requests, meta = build_requests(args, settings.hash_seed, settings.tokenizer)
        meta["workload_args"] = workload_args_meta(args)  # absolute paths: rebuildable later
        client = connect(settings.redis_url)
        check_access(client, settings.redis_url, settings.key_prefix)
        workers = Producer(client, settings).require_workers()
        warning = fit_warning(client, settings, requests, workers)
        if warning:
            print(f"send.py: {warning}", file=sys.stderr)
        run = run_live(
            client, settings, requests, settings.strategy, run_id, args.wait, meta,
            progress=not args.json, timeout_s=args.timeout, reset_caches=args.reset_caches,
        )  # fmt: skip
    except (KVQueueError, ValueError, PermissionError) as exc:
        print(f"send.py: {scrub(str(exc), url)}", file=sys.stderr)
        return EXIT_INVALID
    except redis.exceptions.NoPermissionError as exc:
        print(f"send.py: Redis refused a command kvqueue needs during run {run_id} "
              f"({scrub(str(exc), url)}); grant the rights in docs/reliability.md (ACL)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    except redis.RedisError as exc:
        print(
            f"send.py: lost Redis at {redact(url)} during run {run_id} "
            f"({type(exc).__name__}: {scrub(str(exc), url)}); the workers keep the results "
            "they owe: "
            f"python analysis/dashboard.py --run-id {run_id}",
            file=sys.stderr,
        )
        return EXIT_REDIS_LOST
    if not args.wait:
        print(f"run {run.sent.run_id}: sent {len(run.sent.job_ids)} requests")
        return EXIT_OK
    summary = run_summary(run)
    print(orjson.dumps(summary).decode() if args.json else format_summary(summary))
    return EXIT_FAILED if summary["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
