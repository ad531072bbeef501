"""Mooncake expansion against the previous one (every sub-block hashed): nothing that matters
changes — the same requests, and the same sharing between every pair of requests."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from mooncake_support import random_mooncake_records, write_mooncake_trace
from reference_traces import reference_read_mooncake

from kvqueue.gpu.hashing import BlockHash
from kvqueue.gpu.request import Request
from kvqueue.workloads.traces import read_mooncake

FIXTURE = Path(__file__).parent / "fixtures" / "mooncake_small.jsonl"
SCALES = [1.0, 0.1, 0.5, 1.5]  # 32, 3, 16 and 48 blocks per id


def leading_equal_blocks(a: Request, b: Request) -> int:
    n = 0
    for x, y in zip(a.block_hashes, b.block_hashes, strict=False):
        if x != y:
            break
        n += 1
    return n


def described(request: Request) -> tuple:
    return (
        request.request_id,
        request.num_prompt_tokens,
        request.num_blocks,
        request.max_tokens,
        request.arrival_ms,
        request.token_ids,
    )


def assert_same_requests_and_sharing(new: list[Request], old: list[Request]) -> None:
    assert [described(r) for r in new] == [described(r) for r in old]
    for i, j in itertools.combinations(range(len(new)), 2):
        assert leading_equal_blocks(new[i], new[j]) == leading_equal_blocks(old[i], old[j]), (
            f"{new[i].request_id} and {new[j].request_id} share a different number of blocks"
        )
    # Stronger: at every position of every request, a new hash stands for exactly one old
    # hash and back, so equal blocks are equal in both expansions, wherever they occur.
    old_to_new: dict[BlockHash, BlockHash] = {}
    new_to_old: dict[BlockHash, BlockHash] = {}
    for new_request, old_request in zip(new, old, strict=True):
        for new_hash, old_hash in zip(
            new_request.block_hashes, old_request.block_hashes, strict=True
        ):
            assert old_to_new.setdefault(old_hash, new_hash) == new_hash
            assert new_to_old.setdefault(new_hash, old_hash) == old_hash


@pytest.mark.parametrize("length_scale", SCALES)
def test_the_fixture_expands_to_the_same_requests_and_sharing(length_scale: float) -> None:
    new = read_mooncake(FIXTURE, length_scale=length_scale)
    old = reference_read_mooncake(FIXTURE, length_scale=length_scale)

    assert sum(r.num_blocks for r in new) > 0
    assert_same_requests_and_sharing(new, old)


@pytest.mark.parametrize(("seed", "length_scale"), [(0, 1.0), (1, 1.0), (2, 0.1), (3, 1.5)])
def test_a_random_trace_expands_to_the_same_requests_and_sharing(
    tmp_path: Path, seed: int, length_scale: float
) -> None:
    trace = write_mooncake_trace(
        tmp_path / "trace.jsonl", random_mooncake_records(random.Random(seed), 80)
    )
    options = {"length_scale": length_scale, "hash_seed": f"seed-{seed}", "extra_keys": ["t"]}

    new = read_mooncake(trace, **options)
    old = reference_read_mooncake(trace, **options)

    shared_pairs = sum(leading_equal_blocks(a, b) > 0 for a, b in itertools.combinations(new, 2))
    assert shared_pairs > 100  # the trace does share prefixes, in many pairs
    assert_same_requests_and_sharing(new, old)
