"""The previous Mooncake expansion, kept as a reference for the expansion tests in `test_traces`.

Every 16-token sub-block was hashed on its own: sub-block ``j`` of id ``k`` was the chained
SHA-256 (`kvqueue.gpu.hashing.chain`) of the pseudo-token block ``(MOONCAKE_TAG, k_lo, k_hi,
j, 0, …)`` after the previous block, the first after the root hash. The current reader derives
sub-block hashes from one digest per id instead; the tests check both give the same requests
and the same sharing. Only the expander differs: `reference_read_mooncake` is the current
`read_mooncake` (its parsing unchanged) with the previous expander, verbatim, in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from kvqueue.gpu.hashing import DEFAULT_HASH_SEED, BlockHash, chain, root_hash
from kvqueue.gpu.request import Request
from kvqueue.workloads import traces
from kvqueue.workloads.traces import MOONCAKE_TAG, SUB_BLOCKS_PER_ID, pseudo_blocks


class ReferenceMooncakeExpander:
    """Memo ``(parent, hash_id)`` → the chained hashes of that id's `blocks_per_id` blocks."""

    def __init__(
        self,
        blocks_per_id: int = SUB_BLOCKS_PER_ID,
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


def reference_read_mooncake(path: str | Path, **options) -> list[Request]:
    """`read_mooncake(path, **options)` with every sub-block hashed (see the module docstring)."""
    with mock.patch.object(traces, "MooncakeExpander", ReferenceMooncakeExpander):
        return traces.read_mooncake(path, **options)
