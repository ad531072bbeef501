"""Command-line parsing shared by the benchmarks: ``--quick``, a run of a few seconds, and
lists of positive integers (worker counts, sizes).

Every script in `bench/` takes ``--quick``: the same measurements on a small input, so CI can
run each script as a smoke test (it exits 0 and prints its table). Flags given explicitly
still win over the quick defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: Mapping[str, object]
) -> argparse.Namespace:
    """Parse `argv` after adding ``--quick``; with it, `quick` replaces the parser's defaults."""
    flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument(
        "--quick", action="store_true", help=f"a run of a few seconds (CI smoke test): {flags}"
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def positive_ints(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
    """``--name``'s comma-separated positive integers; else the parser's error naming `text`."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--{name} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"--{name} needs positive integers, got {text!r}")
    return values
