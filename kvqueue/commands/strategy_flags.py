"""The ``--strategies`` and ``--index`` flags every comparing command shares: a comma-separated
list of registered routing policies, each optionally with the index it reads
(``llmd:approximate``), and the index for those that name none."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvqueue.errors import ConfigError
from kvqueue.routing.approximate import INDEX_MODES
from kvqueue.routing.policies.base import INDEX_SEPARATOR, parse_strategy, policy_names


def add_strategies_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: Sequence[str]
) -> None:
    parser.add_argument(
        "--strategies",
        default=",".join(default),
        help=f"comma-separated routing strategies, each NAME or NAME:INDEX (valid: "
        f"{', '.join(policy_names())}; default {','.join(default)})",
    )
    parser.add_argument(
        "--index",
        choices=INDEX_MODES,
        help="prefix index for the strategies that name none: precise (the workers' cache "
        "events) or approximate (what the router routed); default: each policy's upstream's",
    )


def parse_strategies(text: str, index: str | None = None) -> list[str]:
    """The strategies of ``--strategies``, each given `index` unless it names its own;
    ValueError for an empty list, an unknown name or index (listing the valid ones) or a
    strategy given twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--strategies is empty")
    specs = []
    for name in names:
        try:
            _, mode = parse_strategy(name)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        specs.append(name if mode is not None or index is None else name + INDEX_SEPARATOR + index)
    if len(set(specs)) != len(specs):
        raise ValueError(f"--strategies names a strategy twice: {text!r}")
    return specs
