"""Workload flags recorded in a run's metadata, and the requests rebuilt from them.

`workload_args_meta` stores every workload flag (trace and prompt paths made absolute);
runs sent by ``producer/send.py`` store the synthetic workload's name, size, seed and
arrivals, which rebuild it too. `rebuild_requests` turns either back into requests.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvqueue.errors import KVQueueError
from kvqueue.gpu.request import Request
from kvqueue.workloads.options import build_requests
from kvqueue.workloads.synthetic import WORKLOADS

WORKLOAD_ARG_NAMES = (
    "workload",
    "prompts",
    "trace",
    "num_requests",
    "limit",
    "length_scale",
    "arrival_scale",
    "rate",
    "seed",
)


def workload_args_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The workload flags of `args` as JSON values (paths absolute), for run metadata."""
    values: dict[str, Any] = {}
    for name in WORKLOAD_ARG_NAMES:
        value = getattr(args, name, None)
        values[name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    if values["workload"] is None and values["prompts"] is None and values["trace"] is None:
        values["workload"] = getattr(args, "default_workload", None)
    return values


def _namespace_from_meta(meta: Mapping[str, Any]) -> argparse.Namespace | None:
    """Workload flags that rebuild a run's requests, or None when the metadata cannot.

    ``workload_args`` (written by `comparison_meta`) holds every flag; otherwise only a
    synthetic workload named in the metadata (as producer/send.py records it) is rebuilt.
    """
    stored = meta.get("workload_args")
    if isinstance(stored, Mapping):
        values = {name: stored.get(name) for name in WORKLOAD_ARG_NAMES}
    elif meta.get("workload") in WORKLOADS:  # traces and prompt files are named, not located
        values = dict.fromkeys(WORKLOAD_ARG_NAMES)
        values.update(
            workload=meta["workload"],
            num_requests=meta.get("num_requests"),
            rate=meta.get("rate_rps"),
            arrival_scale=meta.get("arrival_scale"),
            length_scale=meta.get("length_scale"),
            seed=meta.get("seed"),
        )
    else:
        return None
    for name, default in (("length_scale", 1.0), ("arrival_scale", 1.0), ("seed", 0)):
        if values[name] is None:
            values[name] = default
    for name in ("prompts", "trace"):
        if values[name] is not None:
            values[name] = Path(values[name])
    return argparse.Namespace(**values, default_workload=None)


def build_from_workload_args(
    workload_args: Mapping[str, Any], hash_seed: str, tokenizer: str | None = None
) -> tuple[list[Request], dict[str, Any]]:
    """The requests that `workload_args_meta` flags describe, and their description.

    Errors raise as `build_requests` raises them (a missing file, a malformed line).
    """
    args = _namespace_from_meta({"workload_args": dict(workload_args)})
    assert args is not None, "workload_args always rebuild"
    return build_requests(args, hash_seed, tokenizer)


def rebuild_requests(
    meta: Mapping[str, Any], hash_seed: str, tokenizer: str | None = None
) -> tuple[list[Request] | None, str]:
    """The requests of a run from its metadata, or (None, why not)."""
    args = _namespace_from_meta(meta)
    if args is None:
        return None, (
            f"run metadata names workload {meta.get('workload')!r} but not where to read it; "
            "pass the same --trace/--prompts flags to rebuild it"
        )
    seed = str(meta.get("hash_seed") or hash_seed)
    try:
        requests, _ = build_requests(args, seed, tokenizer)
    except (KVQueueError, ValueError, OSError) as exc:
        return None, f"cannot rebuild the workload from the run metadata: {exc}"
    return requests, ""
