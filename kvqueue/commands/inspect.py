"""`kvqueue inspect`: the Redis prefix tree decoded for a human (read-only).

    kvqueue inspect summary          every worker's slot, stored and pending blocks
    kvqueue inspect node <hex>       one block's node: who stores it, pending marks, TTL

Redis and the key prefix come from REDIS_URL and KVQ_PREFIX, or --redis-url and --prefix.
"""

from __future__ import annotations

import argparse

from kvqueue.config import Settings
from kvqueue.errors import ConfigError
from kvqueue.live.connection import connect
from kvqueue.routing.inspect import (
    format_node,
    format_summary,
    parse_hash,
    read_node,
    read_slots,
    read_tree,
    summarize,
)
from kvqueue.routing.membership import RedisMembership


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis to read (default: REDIS_URL)")
    parser.add_argument("--prefix", help="kvqueue's key prefix (default: KVQ_PREFIX, kvq:)")
    what = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    what.add_parser("summary", help="every worker's slot, stored and pending blocks (SCANs)")
    node = what.add_parser("node", help="one block's node, by its hash in hex")
    node.add_argument("block_hash", metavar="HEX", help="the block hash, 64 hex characters")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(redis_url=args.redis_url, key_prefix=args.prefix)
    if args.what == "node":
        try:
            block_hash = parse_hash(args.block_hash)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    client = connect(settings.redis_url)
    prefix = settings.key_prefix
    if args.what == "node":
        seconds, micros = client.time()
        print(format_node(read_node(client, block_hash, prefix), seconds * 1000 + micros // 1000))
        return 0
    live = set(RedisMembership(client, prefix).live_workers(settings.heartbeat_ttl_s))
    nodes = read_tree(client, prefix, with_memory=True)
    print(format_summary(read_slots(client, prefix), summarize(nodes), live))
    return 0
