"""The previous Mooncake expansion, kept as a reference for `test_trace_expansion`.

Every 16-token sub-block was hashed on its own: sub-block ``j`` of id ``k`` was the chained
SHA-256 (`kvqueue.gpu.hashing.chain`) of the pseudo-token block ``(MOONCAKE_TAG, k_lo, k_hi,
j, 0, …)`` after the previous block, the first after the root hash. The current reader derives
sub-block hashes from one digest per id instead; the test checks both give the same requests
and the same sharing. Only the expansion differs: the parsing helpers are the current ones
(unchanged), the reading loop is the previous one verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvqueue.errors import InputFormatError
from kvqueue.gpu.hashing import BLOCK_SIZE, DEFAULT_HASH_SEED, BlockHash, chain, root_hash
from kvqueue.gpu.request import Request
from kvqueue.workloads.traces import (
    MAX_ID,
    MOONCAKE_ID_TOKENS,
    MOONCAKE_TAG,
    field_int,
    field_number,
    iter_text_lines,
    parse_json_object,
    pseudo_blocks,
    scaled_input_length,
    sub_blocks_per_id,
)


class ReferenceMooncakeExpander:
    """Memo ``(parent, hash_id)`` → the chained hashes of that id's `blocks_per_id` blocks."""

    def __init__(
        self,
        blocks_per_id: int,
        hash_seed: str = DEFAULT_HASH_SEED,
        extra_keys: Sequence[str] = (),
    ) -> None:
        self.blocks_per_id = blocks_per_id
        self.root = root_hash(hash_seed, extra_keys)
        self._memo: dict[tuple[BlockHash, int], tuple[BlockHash, ...]] = {}

    def id_blocks(self, parent: BlockHash, hash_id: int) -> tuple[BlockHash, ...]:
        key = (parent, hash_id)
        blocks = self._memo.get(key)
        if blocks is None:
            pseudo = pseudo_blocks(MOONCAKE_TAG, hash_id, self.blocks_per_id)
            blocks = tuple(chain(parent, pseudo))
            self._memo[key] = blocks
        return blocks

    def expand(self, hash_ids: Sequence[int], num_blocks: int) -> tuple[BlockHash, ...]:
        out: list[BlockHash] = []
        parent = self.root
        for hash_id in hash_ids:
            if len(out) >= num_blocks:
                break
            blocks = self.id_blocks(parent, hash_id)
            out.extend(blocks[: num_blocks - len(out)])
            parent = blocks[-1]
        assert len(out) == num_blocks, "caller checked the ids cover the input"
        return tuple(out)


def _hash_ids(path: str | Path, lineno: int, data: Mapping[str, Any]) -> list[int]:
    if "hash_ids" not in data:
        raise InputFormatError(f"{path}:{lineno}: missing field 'hash_ids'")
    ids = data["hash_ids"]
    if not isinstance(ids, list):
        raise InputFormatError(f"{path}:{lineno}: hash_ids must be a list, got {ids!r}")
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise InputFormatError(
                f"{path}:{lineno}: hash_ids must hold integers in [0, 2**64), got {value!r}"
            )
    return ids


def _request(
    path: str | Path,
    lineno: int,
    data: Mapping[str, Any],
    expander: ReferenceMooncakeExpander,
    length_scale: float,
    request_id: str,
) -> tuple[float, Request]:
    timestamp = field_number(path, lineno, data, "timestamp")
    input_length = field_int(path, lineno, data, "input_length", minimum=1)
    output_length = field_int(path, lineno, data, "output_length", minimum=0)
    hash_ids = _hash_ids(path, lineno, data)
    needed = math.ceil(input_length / MOONCAKE_ID_TOKENS)
    if len(hash_ids) < needed:
        raise InputFormatError(
            f"{path}:{lineno}: input_length {input_length:,} needs {needed:,} hash_ids "
            f"({MOONCAKE_ID_TOKENS} tokens each); the line has {len(hash_ids):,}"
        )
    num_tokens = scaled_input_length(input_length, length_scale)
    block_hashes = expander.expand(hash_ids, num_tokens // BLOCK_SIZE)
    request = Request(request_id, num_tokens, block_hashes, output_length, timestamp)
    return timestamp, request


def reference_read_mooncake(
    path: str | Path,
    limit: int | None = None,
    length_scale: float = 1.0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    id_prefix: str = "mooncake",
) -> list[Request]:
    """`read_mooncake` as it was, with every sub-block hashed (see the module docstring)."""
    expander = ReferenceMooncakeExpander(sub_blocks_per_id(length_scale), hash_seed, extra_keys)
    stamped: list[tuple[float, Request]] = []
    saw_line = False
    for lineno, text in iter_text_lines(path):
        if limit is not None and len(stamped) >= limit:
            break
        if not text.strip():
            continue
        saw_line = True
        data = parse_json_object(path, lineno, text)
        request_id = f"{id_prefix}-{lineno}"
        stamped.append(_request(path, lineno, data, expander, length_scale, request_id))
    if not saw_line and limit != 0:
        raise InputFormatError(f"{path}:1: the trace is empty")
    if not stamped:
        return []
    first = min(stamp for stamp, _ in stamped)
    return [replace(request, arrival_ms=stamp - first) for stamp, request in stamped]
