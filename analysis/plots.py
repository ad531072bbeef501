"""Draw the PNG plots of a run directory (``dashboard_results.json`` + ``results_*.jsonl``).

    python analysis/plots.py --run kvqueue-demo

Writes hit_rate.png, ttft_cdf.png, e2e_cdf.png, per_worker.png and cache_over_time.png into
the run directory (see `kvqueue.report.plots`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvqueue.report.dashboard import DASHBOARD_FILE
from kvqueue.report.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory")
    args = parser.parse_args(argv)
    if not (args.run / DASHBOARD_FILE).is_file():
        print(f"plots.py: no {DASHBOARD_FILE} in {args.run}", file=sys.stderr)
        return 2
    try:
        paths = plot_run(args.run)
    except (OSError, ValueError, KeyError) as exc:
        print(f"plots.py: cannot plot {args.run}: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
