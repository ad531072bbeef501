"""Workload selection shared by every command line: the same flags build the same requests.

Exactly one source: `--workload NAME` (synthetic), `--prompts FILE` (text or JSONL, through
the tokenizer) or `--trace FILE` (`.jsonl` Mooncake, `.csv` Azure). Then arrivals: as fast as
possible (default for synthetic workloads and prompt files), the trace's timestamps (default
for traces), or Poisson at `--rate`; `--arrival-scale` stretches them. The same seed gives the
same requests whatever strategy runs them. `--cache-salt` salts every request's hash chain as
one tenant's (a prompts file may salt each line itself: `cache_salt` or `tenant`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvqueue.gpu.hashing import DEFAULT_HASH_SEED, salt_keys
from kvqueue.gpu.request import Request
from kvqueue.workloads.arrivals import retime
from kvqueue.workloads.synthetic import WORKLOADS, make_workload, read_prompts
from kvqueue.workloads.traces import read_azure, read_mooncake


def add_workload_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--workload",
        default=None,
        help=f"synthetic workload: {', '.join(sorted(WORKLOADS))}"
        + (f" (default {default})" if default else ""),
    )
    group.add_argument("--prompts", type=Path, help="text file, one prompt per line, or JSONL")
    group.add_argument("--trace", type=Path, help="Mooncake .jsonl or Azure .csv trace")
    group.add_argument("--num-requests", type=int, help="number of requests (synthetic)")
    group.add_argument("--limit", type=int, help="read at most this many trace/prompt lines")
    group.add_argument(
        "--length-scale", type=float, default=1.0, help="shrink trace prompt lengths (e.g. 0.25)"
    )
    group.add_argument(
        "--arrival-scale",
        type=float,
        default=1.0,
        help="multiply inter-arrival times (>1 stretches, <1 compresses)",
    )
    group.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    group.add_argument(
        "--cache-salt",
        help="tenant salt of every request's block hashes (vLLM's cache_salt): requests of "
        "different tenants never share a cached block",
    )
    group.set_defaults(default_workload=default)


def build_requests(
    args: argparse.Namespace, hash_seed: str = DEFAULT_HASH_SEED, tokenizer: str | None = None
) -> tuple[list[Request], dict[str, Any]]:
    """The requests the flags describe, and a description of them for run metadata."""
    sources = [s for s in (args.workload, args.prompts, args.trace) if s is not None]
    if len(sources) > 1:
        raise ValueError("give only one of --workload, --prompts, --trace")
    workload = args.workload or (None if sources else args.default_workload)
    for flag, path in (("--trace", args.trace), ("--prompts", args.prompts)):
        if path is not None:
            check_readable(flag, path)
    cache_salt = getattr(args, "cache_salt", None)
    salted = salt_keys(cache_salt)
    arrivals = "asap"
    if args.trace is not None:
        requests = _read_trace(args.trace, args.limit, args.length_scale, hash_seed, salted)
        name = f"trace:{args.trace.name}"
        arrivals = "trace"
    elif args.prompts is not None:
        from kvqueue.workloads.tokenizer import load_tokenizer

        encoder = load_tokenizer(tokenizer)
        requests = read_prompts(
            args.prompts, encoder.encode, hash_seed=hash_seed, cache_salt=cache_salt
        )
        if args.limit is not None:
            requests = requests[: args.limit]
        name = f"prompts:{args.prompts.name}"
        arrivals = "trace" if any(r.arrival_ms for r in requests) else "asap"
    elif workload is not None:
        requests = make_workload(
            workload, args.num_requests, seed=args.seed, hash_seed=hash_seed, extra_keys=salted
        )
        name = workload
    else:
        raise ValueError("no workload: give --workload NAME, --prompts FILE or --trace FILE")
    if args.rate is not None:
        arrivals = "poisson"
    requests = retime(requests, arrivals, args.rate, args.seed, args.arrival_scale)
    meta = {
        "workload": name,
        "num_requests": len(requests),
        "arrivals": arrivals,
        "rate_rps": args.rate,
        "arrival_scale": args.arrival_scale,
        "length_scale": args.length_scale,
        "seed": args.seed,
        "salted": cache_salt is not None,  # never the salt itself: it keeps tenants apart
    }
    return requests, meta


def check_readable(flag: str, path: Path) -> None:
    """Raise ValueError in one line, naming the flag and path, unless `path` is a file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: not a file")


def _read_trace(
    path: Path, limit: int | None, length_scale: float, hash_seed: str, extra_keys: tuple[str, ...]
) -> list[Request]:
    options = {"limit": limit, "length_scale": length_scale, "hash_seed": hash_seed}
    if path.suffix == ".csv":
        return read_azure(path, extra_keys=extra_keys, **options)
    if path.suffix in (".jsonl", ".json"):
        return read_mooncake(path, extra_keys=extra_keys, **options)
    raise ValueError(
        f"unknown trace format {path.name!r}: expected .jsonl (Mooncake) or .csv (Azure)"
    )
