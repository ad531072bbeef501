"""Mooncake and Azure trace replay on small fixtures, and whether a trace fits a preset."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mooncake_support import random_mooncake_records, write_mooncake_trace
from reference_traces import reference_read_mooncake

from kvqueue.errors import InputFormatError
from kvqueue.gpu.hashing import BlockHash, hash_block, root_hash
from kvqueue.gpu.request import Request
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.workloads.traces import (
    MOONCAKE_TAG,
    MooncakeExpander,
    fits_report,
    read_azure,
    read_mooncake,
    unit_digest,
)

FIXTURES = Path(__file__).parent / "fixtures"
MOONCAKE = FIXTURES / "mooncake_small.jsonl"
AZURE = FIXTURES / "azure_small.csv"
GOOD_MOONCAKE_LINE = '{"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [7, 8]}'
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def common_prefix(a: Request, b: Request) -> int:
    n = 0
    for x, y in zip(a.block_hashes, b.block_hashes, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- Mooncake ------------------------------------------------------------------------------------
def test_mooncake_ids_expand_to_32_blocks_and_the_partial_last_block_is_dropped():
    requests = read_mooncake(MOONCAKE)
    # input lengths 1100, 1024, 700, 300, 10 → full blocks 68 (= 32 + 32 + 4), 64, 43, 18, 0
    assert [r.num_blocks for r in requests] == [68, 64, 43, 18, 0]
    assert [r.num_prompt_tokens for r in requests] == [1100, 1024, 700, 300, 10]
    assert [r.max_tokens for r in requests] == [10, 5, 3, 0, 1]
    assert all(r.token_ids is None for r in requests)


def test_mooncake_requests_sharing_k_leading_ids_share_exactly_32k_blocks():
    r1, r2, r3, r4, _ = read_mooncake(MOONCAKE)
    assert common_prefix(r1, r2) == 64  # ids [0, 1] in common
    assert common_prefix(r1, r3) == 32  # id [0]
    assert common_prefix(r2, r3) == 32
    assert common_prefix(r1, r4) == 0
    assert ideal_hit_rate([r1, r2, r3, r4]) == (64 + 32) / (68 + 64 + 43 + 18)


def test_mooncake_blocks_derive_from_one_chained_digest_per_hash_id():
    r1 = read_mooncake(MOONCAKE, hash_seed="s", extra_keys=["tenant"])[0]  # ids [0, 1, 2]
    digest_0 = hash_block(root_hash("s", ["tenant"]), (MOONCAKE_TAG, 0, 0))
    digest_1 = hash_block(digest_0, (MOONCAKE_TAG, 1, 0))
    digest_2 = hash_block(digest_1, (MOONCAKE_TAG, 2, 0))
    assert unit_digest(digest_0, 1) == digest_1
    for k, digest in enumerate((digest_0, digest_1, digest_2)):
        expected = [digest[:28] + j.to_bytes(4, "little") for j in range(32)]
        assert list(r1.block_hashes[32 * k : 32 * (k + 1)]) == expected[: 68 - 32 * k]
    # The seed and the extra keys feed the root, hence every block.
    assert not set(read_mooncake(MOONCAKE)[0].block_hashes) & set(r1.block_hashes)
    assert not set(read_mooncake(MOONCAKE, hash_seed="s")[0].block_hashes) & set(r1.block_hashes)


def test_an_id_after_a_different_prefix_expands_to_different_blocks():
    expander = MooncakeExpander()
    a, b = expander.expand([1, 7], 64), expander.expand([2, 7], 64)
    assert not set(a) & set(b)
    assert expander.expand([1, 7], 64) == a


def test_mooncake_arrivals_are_relative_to_the_first_timestamp_and_ids_name_lines():
    requests = read_mooncake(MOONCAKE)
    assert [r.arrival_ms for r in requests] == [0.0, 150.0, 300.0, 300.0, 900.0]
    assert [r.request_id for r in requests] == [
        "mooncake-1", "mooncake-2", "mooncake-4", "mooncake-5", "mooncake-6"
    ]  # fmt: skip


def test_mooncake_limit_reads_the_first_requests():
    assert [r.request_id for r in read_mooncake(MOONCAKE, limit=2)] == ["mooncake-1", "mooncake-2"]
    assert read_mooncake(MOONCAKE, limit=0) == []


def test_length_scale_shrinks_every_id_alike_and_keeps_the_sharing():
    r1, r2, r3, r4, r5 = read_mooncake(MOONCAKE, length_scale=0.1)  # 3 blocks per id
    # 1100 × 3/32 = 103.1 → 103 tokens → 6 blocks; 1024 → 96 → 6; 700 → 66 → 4; 300 → 28 → 1
    assert [r.num_prompt_tokens for r in (r1, r2, r3, r4, r5)] == [103, 96, 66, 28, 1]
    assert [r.num_blocks for r in (r1, r2, r3, r4, r5)] == [6, 6, 4, 1, 0]
    assert (common_prefix(r1, r2), common_prefix(r1, r3), common_prefix(r1, r4)) == (6, 3, 0)


@settings(max_examples=60, deadline=None)
@given(
    ids_a=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    ids_b=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    cut_a=st.integers(0, 31),
    cut_b=st.integers(0, 31),
)
def test_shared_blocks_are_32_per_shared_leading_id(ids_a, ids_b, cut_a, cut_b):
    expander = MooncakeExpander(blocks_per_id=32)
    n_a, n_b = 32 * len(ids_a) - cut_a, 32 * len(ids_b) - cut_b
    blocks_a, blocks_b = expander.expand(ids_a, n_a), expander.expand(ids_b, n_b)
    shared_ids = 0
    while shared_ids < min(len(ids_a), len(ids_b)) and ids_a[shared_ids] == ids_b[shared_ids]:
        shared_ids += 1
    shared_blocks = 0
    while shared_blocks < min(n_a, n_b) and blocks_a[shared_blocks] == blocks_b[shared_blocks]:
        shared_blocks += 1
    assert (len(blocks_a), len(blocks_b)) == (n_a, n_b)
    assert shared_blocks == min(32 * shared_ids, n_a, n_b)


# -- the expansion against the previous one (every sub-block hashed) -----------------------------
# Nothing that matters changes: the same requests, and the same sharing between every pair.
SCALES = [1.0, 0.1, 0.5, 1.5]  # 32, 3, 16 and 48 blocks per id


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
        assert common_prefix(new[i], new[j]) == common_prefix(old[i], old[j]), (
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
    new = read_mooncake(MOONCAKE, length_scale=length_scale)
    old = reference_read_mooncake(MOONCAKE, length_scale=length_scale)

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

    shared_pairs = sum(common_prefix(a, b) > 0 for a, b in itertools.combinations(new, 2))
    assert shared_pairs > 100  # the trace does share prefixes, in many pairs
    assert_same_requests_and_sharing(new, old)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"timestamp": 1, "output_length": 2, "hash_ids": [1]}', "missing field 'input_length'"),
        ('{"input_length": 5, "output_length": 2, "hash_ids": [1]}', "missing field 'timestamp'"),
        ('{"timestamp": "1", "input_length": 5, "output_length": 2, "hash_ids": [1]}',
         "timestamp must be a number"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 2, "hash_ids": [1]}',
         "input_length must be an integer >= 1"),
        ('{"timestamp": 1, "input_length": true, "output_length": 2, "hash_ids": [1]}',
         "input_length must be an integer"),
        ('{"timestamp": 1, "input_length": "5", "output_length": 2, "hash_ids": [1]}',
         "input_length must be an integer >= 1, got '5'"),
        ('{"timestamp": 1, "input_length": 5, "output_length": -2, "hash_ids": [1]}',
         "output_length must be an integer >= 0"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": 1}',
         "hash_ids must be a list"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": ["a"]}',
         "hash_ids must hold integers"),
        ('{"timestamp": 1, "input_length": 1025, "output_length": 2, "hash_ids": [1, 2]}',
         "input_length 1,025 needs 3 hash_ids"),
    ],
)  # fmt: skip
def test_malformed_mooncake_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "trace.jsonl"
    path.write_text(f"{GOOD_MOONCAKE_LINE}\n{line}\n{GOOD_MOONCAKE_LINE}\n")
    with pytest.raises(InputFormatError, match=rf"trace\.jsonl:2: {message}"):
        read_mooncake(path)


def test_empty_or_non_utf8_mooncake_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputFormatError, match=r"empty\.jsonl:1: the trace is empty"):
        read_mooncake(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(GOOD_MOONCAKE_LINE.encode() + b"\n\xff\xfe\n")
    with pytest.raises(InputFormatError, match=r"binary\.jsonl:2: not valid UTF-8"):
        read_mooncake(binary)


def test_bad_length_scale_is_refused():
    with pytest.raises(ValueError, match="length_scale must be a positive number, got 0"):
        read_mooncake(MOONCAKE, length_scale=0)


# -- Azure ---------------------------------------------------------------------------------------
def test_azure_rows_become_requests_with_unique_blocks_and_relative_arrivals():
    requests = read_azure(AZURE)
    assert [r.num_prompt_tokens for r in requests] == [374, 396, 16]
    assert [r.num_blocks for r in requests] == [23, 24, 1]
    assert [r.max_tokens for r in requests] == [44, 109, 0]
    assert [r.request_id for r in requests] == ["azure-2", "azure-3", "azure-4"]
    assert [r.arrival_ms for r in requests] == pytest.approx([0.0, 4314.579, 4319.41])
    assert ideal_hit_rate(requests) == 0.0


def test_azure_length_scale_and_limit():
    requests = read_azure(AZURE, limit=2, length_scale=0.5)
    assert [(r.num_prompt_tokens, r.num_blocks) for r in requests] == [(187, 11), (198, 12)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("2023-11-16 18:15:47,10", "expected 3 fields like the header, got 2"),
        ("2023-11-16 18:15:47,10,1,9", "expected 3 fields like the header, got 4"),
        ("16/11/2023 18:15,10,1", "TIMESTAMP '16/11/2023 18:15' is not"),
        ("2023-11-16 18:15:47.12a,10,1", "TIMESTAMP '2023-11-16 18:15:47.12a' is not"),
        ("2023-11-16 18:15:47,ten,1", "ContextTokens must be an integer >= 1, got 'ten'"),
        ("2023-11-16 18:15:47,0,1", "ContextTokens must be an integer >= 1, got '0'"),
        ("2023-11-16 18:15:47,10,", "GeneratedTokens must be an integer >= 0, got ''"),
    ],
)
def test_malformed_azure_rows_name_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "azure.csv"
    path.write_text(f"{AZURE_HEADER}\n2023-11-16 18:15:46.5,374,44\n{row}\n")
    with pytest.raises(InputFormatError, match=rf"azure\.csv:3: {message}"):
        read_azure(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"azure\.csv:1: the trace is empty"),
        ("time,ContextTokens,GeneratedTokens\n", r"azure\.csv:1: CSV header lacks TIMESTAMP"),
        (f"{AZURE_HEADER}\n", r"azure\.csv:2: the trace has a header but no requests"),
    ],
)
def test_malformed_azure_files_are_errors(tmp_path, text, message):
    path = tmp_path / "azure.csv"
    path.write_text(text)
    with pytest.raises(InputFormatError, match=message):
        read_azure(path)


# -- fitting a preset ----------------------------------------------------------------------------
def test_fits_report_counts_requests_over_the_context_or_the_cache():
    report = fits_report(read_mooncake(MOONCAKE), max_context_tokens=1024, num_blocks=60)
    # 1100 + 10 tokens: over context, 70 blocks; 1024 + 5: prompt fills the context, 65 blocks
    assert (report.num_requests, report.num_unfit) == (5, 2)
    assert (report.num_over_context, report.num_over_blocks) == (2, 2)
    assert report.max_prompt_tokens == 1100
    assert [rid for rid, _ in report.examples] == ["mooncake-1", "mooncake-2"]
    assert report.examples[0][1] == (
        "prompt of 1,100 + 10 output tokens exceeds the 1,024-token context; "
        "needs 70 KV blocks; the cache holds 60"
    )
    assert report.to_dict()["examples"][1][0] == "mooncake-2"


def test_fits_report_of_a_trace_that_fits():
    report = fits_report(read_mooncake(MOONCAKE), max_context_tokens=4096, num_blocks=924)
    assert (report.num_unfit, report.examples) == (0, ())
