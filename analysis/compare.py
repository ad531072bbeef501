"""Compare routing strategies on the live pipeline: the same workload once per strategy.

    python analysis/compare.py --workload shared-prefix-medium --rate 4 \\
        --strategies cache_aware,round_robin,least_loaded --workers 4 --time-scale 0.5
    python analysis/compare.py --trace trace.jsonl --limit 100 --length-scale 0.1 \\
        --preset llama-3.1-8b@a100-80gb --workers 4 --time-scale 0.2

Redis from REDIS_URL (kvqueue's routing keys under KVQ_PREFIX are cleared between runs); if
unset, an embedded redis-server. Fresh `rq worker -w workers.KVWorker` processes per
strategy (--preset/--num-blocks reach them as KVQ_PRESET/KVQ_NUM_BLOCKS). Writes
dashboard_results.json, results_<strategy>.jsonl and the PNG plots to --out (default
runs/compare-<time>) and prints the table. Arrivals follow the workload flags: as fast as
possible unless --rate (Poisson) or a trace's timestamps. See `kvqueue.live.comparison`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvqueue.commands.demo import configure_common, run_comparison_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure_common(parser, default_workload=None)
    return run_comparison_command(parser.parse_args(argv), "compare.py")


if __name__ == "__main__":
    sys.exit(main())
