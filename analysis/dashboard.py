"""Build ``dashboard_results.json`` from runs already in Redis, by run id.

    python analysis/dashboard.py --run-id RUN_A --run-id RUN_B --out DIR [--plots]

Reads each run's results stream and metadata from REDIS_URL under KVQ_PREFIX and writes
DIR/dashboard_results.json (``ideal_hit_rate`` and, per strategy, ``hit_rate``, ``ttft_ms``
and ``e2e_ms`` {mean, p50, p90, p99}, ``completed``, ``rejected``, ``failed``,
``per_worker``, ...) and DIR/results_<strategy>.jsonl. The ideal hit rate needs the
requests: they are rebuilt from the run metadata, or from the workload flags given here
(the same flags the run was sent with); see `kvqueue.report.stored_runs`.
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
from kvqueue.report.dashboard import format_engine_table, format_table, results_path, write_run
from kvqueue.report.stored_runs import dashboard_from_runs
from kvqueue.workloads.options import add_workload_arguments, build_requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-id", action="append", required=True, help="a run id (repeat for several)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--plots", action="store_true", help="also write the PNG plots and report.html"
    )
    parser.add_argument("--json", action="store_true", help="print the dashboard JSON on stdout")
    parser.add_argument("--tokenizer", help="tokenizer name or path for --prompts")
    add_workload_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(tokenizer=args.tokenizer)
        requests = None
        if any(x is not None for x in (args.workload, args.prompts, args.trace)):
            requests, _ = build_requests(args, settings.hash_seed, settings.tokenizer)
        loaded = dashboard_from_runs(
            connect(settings.redis_url),
            args.run_id,
            settings.key_prefix,
            requests=requests,
            hash_seed=settings.hash_seed,
            tokenizer=settings.tokenizer,
        )
    except (KVQueueError, ValueError) as exc:
        print(f"dashboard.py: {exc}", file=sys.stderr)
        return 2
    for note in loaded.notes:
        print(f"dashboard.py: {note}", file=sys.stderr)
    path = write_run(args.out, loaded.dashboard, loaded.results_by_strategy)
    out = sys.stderr if args.json else sys.stdout
    print(format_table(loaded.dashboard), file=out)
    engine_table = format_engine_table(loaded.dashboard)
    if engine_table:
        print(f"\n{engine_table}", file=out)
    print(f"\nwrote {path}", file=out)
    written = [results_path(args.out, name) for name in loaded.results_by_strategy]
    if args.plots:
        from kvqueue.report.plots import write_plots
        from kvqueue.report.run_report import write_run_report

        plots = write_plots(args.out, loaded.dashboard, loaded.results_by_strategy)
        written += [write_run_report(args.out, loaded.dashboard, plots), *plots]
    for file in written:
        print(f"      {file}", file=out)
    if args.json:
        sys.stdout.write(orjson.dumps(loaded.dashboard).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
