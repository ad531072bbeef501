"""The `kvqueue` command. Each subcommand lives in its own `kvqueue.commands.<name>` module
exposing `configure(parser)` and `run(args) -> int`; this module only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

from kvqueue.errors import KVQueueError

COMMANDS = {
    "presets": "model × GPU presets and the KV-block arithmetic",
    "simulate": "run strategies on a workload in virtual time",
    "demo": "compare strategies on a live pipeline (embedded Redis if REDIS_URL is unset)",
    "sweep": "capacity and SLO sweep over offered rates and cluster sizes, in virtual time",
    "evaluate": "run every policy on the evaluation suite in the simulator",
    "inspect": "the Redis prefix tree decoded for a human: a summary, or one block's node",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvqueue", description="KV-cache-aware routing testbed on Redis and RQ."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"kvqueue.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvqueue.commands.{name}":
                raise
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KVQueueError as exc:
        print(f"kvqueue {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
