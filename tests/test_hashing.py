"""Chained block hashing: block size, chaining, salts, and the same hashes in every process."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.gpu.hashing import (
    BLOCK_SIZE,
    DEFAULT_HASH_SEED,
    chain,
    from_hex,
    hash_block,
    hash_token_blocks,
    num_full_blocks,
    pack_hashes,
    root_hash,
    to_hex,
    unpack_hashes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_block_holds_16_tokens():
    assert BLOCK_SIZE == 16
    assert len(hash_token_blocks(list(range(16)))) == 1
    assert len(hash_token_blocks(list(range(15)))) == 0


@pytest.mark.parametrize(("num_tokens", "num_hashes"), [(0, 0), (15, 0), (31, 1), (32, 2), (33, 2)])
def test_only_full_blocks_are_hashed(num_tokens, num_hashes):
    tokens = list(range(num_tokens))
    assert len(hash_token_blocks(tokens)) == num_hashes
    assert num_full_blocks(num_tokens) == num_hashes


def test_trailing_partial_block_does_not_change_the_full_block_hashes():
    tokens = list(range(40))
    assert hash_token_blocks(tokens) == hash_token_blocks(tokens[:32])


def test_block_hash_is_sha256_of_parent_hash_and_little_endian_uint32_tokens():
    tokens = list(range(100, 132))
    h0 = hashlib.sha256(root_hash() + struct.pack("<16I", *tokens[:16])).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<16I", *tokens[16:])).digest()
    assert hash_token_blocks(tokens) == [h0, h1]


def test_changing_a_token_in_block_0_changes_every_later_hash():
    tokens = list(range(64))
    edited = [999, *tokens[1:]]
    original, changed = hash_token_blocks(tokens), hash_token_blocks(edited)
    assert len(original) == len(changed) == 4
    assert all(a != b for a, b in zip(original, changed, strict=True))


def test_same_block_after_different_prefixes_hashes_differently():
    shared_block = list(range(500, 516))
    a = hash_token_blocks([1] * 16 + shared_block)
    b = hash_token_blocks([2] * 16 + shared_block)
    assert a[1] != b[1]


def test_changing_a_later_block_keeps_the_earlier_hashes():
    tokens = list(range(64))
    edited = [*tokens[:40], 999, *tokens[41:]]
    original, changed = hash_token_blocks(tokens), hash_token_blocks(edited)
    assert original[:2] == changed[:2]
    assert original[2] != changed[2] and original[3] != changed[3]


# Prompts built from 3 possible block contents (plus a partial tail): the same block after
# different prefixes, and shared prefixes, are both common.
BLOCK_CONTENTS = [[7] * 16, list(range(16)), [7] * 15 + [8]]
block_prompts = st.tuples(
    st.lists(st.integers(0, len(BLOCK_CONTENTS) - 1), max_size=6),
    st.lists(st.integers(0, 9), max_size=15),
).map(lambda p: [t for b in p[0] for t in BLOCK_CONTENTS[b]] + p[1])


@settings(max_examples=300, deadline=None)
@given(a=block_prompts, b=block_prompts)
def test_equal_hash_means_equal_whole_prefix(a, b):
    ha, hb = hash_token_blocks(a), hash_token_blocks(b)
    for i in range(min(len(ha), len(hb))):
        same_prefix = a[: (i + 1) * BLOCK_SIZE] == b[: (i + 1) * BLOCK_SIZE]
        assert (ha[i] == hb[i]) == same_prefix


def test_chain_continues_hash_token_blocks():
    tokens = list(range(64))
    full = hash_token_blocks(tokens)
    blocks = [tokens[i : i + 16] for i in range(32, 64, 16)]
    assert chain(full[1], blocks) == full[2:]
    assert hash_block(full[0], tokens[16:32]) == full[1]


def test_tenant_salt_on_the_first_block_separates_tenants():
    tokens = list(range(48))
    tenant_a = hash_token_blocks(tokens, extra_keys=["tenant-a"])
    tenant_b = hash_token_blocks(tokens, extra_keys=["tenant-b"])
    unsalted = hash_token_blocks(tokens)
    assert not set(tenant_a) & set(tenant_b)
    assert not set(tenant_a) & set(unsalted)
    assert hash_token_blocks(tokens, extra_keys=["tenant-a"]) == tenant_a


def test_extra_keys_are_not_ambiguous_when_concatenated():
    assert root_hash(extra_keys=["ab", "c"]) != root_hash(extra_keys=["a", "bc"])
    assert root_hash(extra_keys=["model", "tenant"]) != root_hash(extra_keys=["tenant", "model"])


def test_seed_changes_every_hash_and_is_deterministic():
    tokens = list(range(32))
    assert hash_token_blocks(tokens, seed="run-1") == hash_token_blocks(tokens, seed="run-1")
    assert not set(hash_token_blocks(tokens, seed="run-1")) & set(hash_token_blocks(tokens))
    assert hash_token_blocks(tokens) == hash_token_blocks(tokens, seed=DEFAULT_HASH_SEED)


_SUBPROCESS_HASHER = """
import json, sys
from kvqueue.gpu.hashing import hash_token_blocks
spec = json.loads(sys.argv[1])
print(json.dumps([h.hex() for h in hash_token_blocks(
    spec["tokens"], seed=spec["seed"], extra_keys=spec["extra_keys"])]))
"""


def _hashes_in_subprocess(spec: dict, python_hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": python_hash_seed, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_HASHER, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_producer_and_worker_processes_compute_the_same_hashes():
    spec = {
        "tokens": [(i * 7919) % 50_000 for i in range(16 * 5 + 3)],
        "seed": "cluster-seed",
        "extra_keys": ["llama-2-13b", "tenant-7"],
    }
    producer = _hashes_in_subprocess(spec, python_hash_seed="1")
    worker = _hashes_in_subprocess(spec, python_hash_seed="4242")
    here = to_hex(hash_token_blocks(spec["tokens"], spec["seed"], spec["extra_keys"]))
    assert len(here) == 5
    assert producer == worker == here


def test_hex_round_trip():
    hashes = hash_token_blocks(list(range(48)))
    assert from_hex(to_hex(hashes)) == hashes
    assert all(len(h) == 64 for h in to_hex(hashes))


@pytest.mark.parametrize(("text", "why"), [("zz" * 32, "not hexadecimal"), ("ab" * 4, "4 bytes")])
def test_malformed_hex_hash_is_rejected_naming_it(text, why):
    with pytest.raises(ValueError, match=why) as info:
        from_hex([text])
    assert text in str(info.value)


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=40))
def test_packed_hashes_unpack_to_the_same_chain(raw: list[bytes]) -> None:
    packed = pack_hashes(raw)

    assert unpack_hashes(packed) == raw
    assert len(packed) == 4 * -(-32 * len(raw) // 3)  # base64: 4 characters per 3 bytes


@pytest.mark.parametrize(
    ("packed", "why"),
    [("not base64!", "are not base64"), (pack_hashes([b"x" * 32])[:-4], "not a multiple of 32")],
)
def test_a_malformed_packed_chain_is_refused_with_what_is_wrong(packed: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        unpack_hashes(packed)
