"""`kvqueue presets`: the preset table and the arithmetic behind each block count."""

from __future__ import annotations

import argparse

from kvqueue.gpu.presets import DEFAULT_PRESET, all_presets, get_preset


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="show only this MODEL@GPU preset, with its arithmetic")
    parser.add_argument("--num-blocks", type=int, help="override the derived block count")
    parser.add_argument("--max-context", type=int, help="override the model's context length")
    parser.add_argument("--all", action="store_true", help="print the arithmetic of every preset")


def run(args: argparse.Namespace) -> int:
    if args.preset or args.num_blocks is not None or args.max_context is not None:
        presets = [get_preset(args.preset or DEFAULT_PRESET, args.num_blocks, args.max_context)]
    else:
        presets = all_presets()
    header = f"{'preset':<26} {'bytes/block':>12} {'blocks':>8} {'KV tokens':>11} {'context':>8}"
    print(header)
    print("-" * len(header))
    for p in presets:
        mark = " (default)" if p.name == DEFAULT_PRESET else ""
        print(
            f"{p.name:<26} {p.bytes_per_block:>12,} {p.num_blocks:>8,} {p.kv_tokens:>11,} "
            f"{p.max_context_tokens:>8,}{mark}"
        )
    shown = presets if (args.all or len(presets) == 1) else [get_preset(DEFAULT_PRESET)]
    for p in shown:
        print(f"\n{p.name}:\n{p.arithmetic()}")
    return 0
