"""`kvqueue evaluate`: every registered policy on the evaluation suite, simulated.

    kvqueue evaluate                       # the whole suite → runs/evaluate-<time>/policies.md
    kvqueue evaluate --out docs/policies.md  # regenerate the documented comparison (+ figures)
    kvqueue evaluate --workloads shared-prefix-50,no-sharing --policies predictive,round_robin
    kvqueue evaluate --engines batched:calibrated --out /tmp/batched.md

See `kvqueue.report.evaluation` for the workloads, how their arrival rates are set, and the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.report.evaluation.runner import run_suite
from kvqueue.report.evaluation.suite import (
    AZURE_REQUESTS,
    DEFAULT_DATA_DIR,
    EVALUATED_ENGINES,
    INDEX_VARIANTS,
    MOONCAKE_REQUESTS,
)
from kvqueue.routing.approximate import INDEX_MODES


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_engines(text: str | None) -> list[EngineConfig]:
    """``sequential:seed,batched:calibrated`` → engine models (default: `EVALUATED_ENGINES`)."""
    if not text:
        return list(EVALUATED_ENGINES)
    engines = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        engine, _, latency = item.partition(":")
        if not latency:
            raise ConfigError(
                f"engine model {item!r} is not ENGINE:LATENCY (e.g. batched:calibrated)"
            )
        engines.append(EngineConfig(engine, latency))
    return engines


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown report (default runs/evaluate-<time>/policies.md; give "
        "docs/policies.md to update the documented comparison)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"directory of the real traces (default {DEFAULT_DATA_DIR}); missing ones are "
        "left out",
    )
    parser.add_argument(
        "--policies",
        help="comma-separated policies, each NAME or NAME:INDEX (default: all registered, "
        "plus " + ", ".join(INDEX_VARIANTS) + ")",
    )
    parser.add_argument("--workloads", help="comma-separated workload keys (default: all)")
    parser.add_argument("--jobs", type=int, help="processes (default: min(2, CPUs))")
    parser.add_argument(
        "--mooncake-requests",
        type=int,
        default=MOONCAKE_REQUESTS,
        help=f"the last N requests of the Mooncake trace (default {MOONCAKE_REQUESTS:,})",
    )
    parser.add_argument(
        "--azure-requests",
        type=int,
        default=AZURE_REQUESTS,
        help=f"the first N requests of the Azure trace (default {AZURE_REQUESTS:,})",
    )
    parser.add_argument(
        "--size",
        type=float,
        default=1.0,
        help="shrink the synthetic workloads by this factor (smoke runs; default 1)",
    )
    parser.add_argument(
        "--engines",
        help="comma-separated ENGINE:LATENCY models to run the suite under (default: "
        + ",".join(f"{e.engine}:{e.latency}" for e in EVALUATED_ENGINES)
        + ")",
    )
    parser.add_argument(
        "--index",
        choices=INDEX_MODES,
        help="run every policy on this index (default: each on its upstream's, plus the "
        "other index for the policies whose upstream runs both)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def default_out() -> Path:
    """Where a report goes when --out is not given: a fresh run directory, never docs/."""
    return Path("runs") / time.strftime("evaluate-%Y%m%d-%H%M%S") / "policies.md"


def run(args: argparse.Namespace) -> int:
    markdown, figures = run_suite(
        out=args.out or default_out(),
        data_dir=args.data_dir,
        policies=_names(args.policies),
        workloads=_names(args.workloads),
        jobs=args.jobs,
        size=args.size,
        mooncake_requests=args.mooncake_requests,
        azure_requests=args.azure_requests,
        quiet=args.quiet,
        engines=parse_engines(args.engines),
        index_mode=args.index,
    )
    print(f"wrote {markdown} and {', '.join(str(f) for f in figures)}")
    return 0
