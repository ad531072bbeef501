"""Run every routing policy on the evaluation suite and write its report.

    python analysis/policies.py --out docs/policies.md [--jobs 2] [--policies ...]

The same as `kvqueue evaluate` (flags and all); the logic lives in `kvqueue.report.evaluation`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvqueue.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
