"""The ``--strategies`` flag every comparing command shares: a comma-separated list of
registered routing policies, its default named in the help."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvqueue.routing.policies.base import policy_names


def add_strategies_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: Sequence[str]
) -> None:
    parser.add_argument(
        "--strategies",
        default=",".join(default),
        help=f"comma-separated routing strategies (valid: {', '.join(policy_names())}; "
        f"default {','.join(default)})",
    )


def parse_strategies(text: str) -> list[str]:
    """The names of ``--strategies``; ValueError for an empty list, an unknown name (listing
    the valid ones) or a name given twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    valid = policy_names()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(valid)}")
    if not names:
        raise ValueError("--strategies is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"--strategies names a strategy twice: {text!r}")
    return names
