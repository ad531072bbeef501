"""The engine flags every command shares; each maps onto a `Settings` field (and its
environment variable), so a flag not given keeps the environment's value."""

from __future__ import annotations

import argparse
from typing import Any

from kvqueue.gpu.engines import DEFAULT_ENGINE, ENGINES
from kvqueue.gpu.profiles import DEFAULT_LATENCY_PROFILE, LATENCY_PROFILES


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    default_engine: str = DEFAULT_ENGINE,
    default_latency: str = DEFAULT_LATENCY_PROFILE,
) -> None:
    """The flags, their help naming the command's defaults (which `Settings.from_env` must be
    given as its `defaults` where they are not `Settings`' own)."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        help="how a simulated GPU serves requests: sequential (one at a time) or batched "
        f"(continuous batching, vLLM's scheduler); default {default_engine} (env KVQ_ENGINE)",
    )
    group.add_argument(
        "--latency",
        choices=LATENCY_PROFILES,
        help="latency profile: seed (the seed's constants) or calibrated (per preset, "
        f"docs/latency.md); default {default_latency} (env KVQ_LATENCY)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="batched engine: tokens per step (default: vLLM's for the GPU; "
        "env KVQ_MAX_NUM_BATCHED_TOKENS)",
    )
    group.add_argument(
        "--max-num-seqs",
        type=int,
        help="batched engine: running requests at most (default: vLLM's for the GPU; "
        "env KVQ_MAX_NUM_SEQS)",
    )


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword overrides for `Settings.from_env` (None: not given)."""
    return {
        "engine": args.engine,
        "latency_profile": args.latency,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
    }
