"""Chained block hashing: the one function producer, router and worker all use.

A prompt of token ids is cut into blocks of `BLOCK_SIZE` tokens; only full blocks are hashed.
Block i's hash is ``SHA-256(h_{i-1} || tokens of block i)``, with ``h_{-1}`` derived from a
configured seed and optional extra keys (model name, tenant salt). Hence equal hash ⇒ equal
whole prefix, and two tenants with different salts never share a block.

A tenant's salt (vLLM's per-request `cache_salt`, which `generate_block_hash_extra_keys` adds
to the extra keys of a request's first block, vllm@v0.27.1:vllm/v1/core/kv_cache_utils.py)
enters the chain's root through `salt_keys`: with chained hashes, salting the root salts every
block after it. The salt is tagged (``("cache_salt", salt)``), so it cannot collide with another
extra key that happens to be the same string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

BLOCK_SIZE = 16
DEFAULT_HASH_SEED = "kvqueue"


def root_hash(seed: str = DEFAULT_HASH_SEED, extra_keys: Sequence[str] = ()) -> BlockHash:
    """The parent hash of the first block: a pure function of the seed and the extra keys."""
    digest = hashlib.sha256(b"kvqueue-root\x00" + seed.encode())
    for key in extra_keys:
        digest.update(b"\x00" + key.encode())
    return BlockHash(digest.digest())


def salt_keys(cache_salt: str | None) -> tuple[str, ...]:
    """Extra keys for a tenant's cache salt: none without one (the unsalted chain)."""
    if cache_salt is None:
        return ()
    if not cache_salt:
        raise ValueError("cache_salt must not be empty (omit it for no salt)")
    return ("cache_salt", cache_salt)


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """``SHA-256(parent || tokens)`` with tokens packed as unsigned 32-bit little-endian ints."""
    return BlockHash(hashlib.sha256(parent + struct.pack(f"<{len(tokens)}I", *tokens)).digest())


def num_full_blocks(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Full blocks in a prompt of `num_tokens` tokens; a trailing partial block is not counted."""
    return num_tokens // block_size


def hash_token_blocks(
    token_ids: Sequence[int],
    seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    block_size: int = BLOCK_SIZE,
) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids`, in prompt order."""
    parent = root_hash(seed, extra_keys)
    hashes: list[BlockHash] = []
    for start in range(0, num_full_blocks(len(token_ids), block_size) * block_size, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def chain(parent: BlockHash, blocks: Iterable[Sequence[int]]) -> list[BlockHash]:
    """Continue a chain from `parent` over already-cut blocks (used by trace expansion)."""
    hashes: list[BlockHash] = []
    for tokens in blocks:
        parent = hash_block(parent, tokens)
        hashes.append(parent)
    return hashes


def to_hex(block_hashes: Iterable[BlockHash]) -> list[str]:
    """Hex form for Redis keys and JSON."""
    return [h.hex() for h in block_hashes]


def from_hex(hex_hashes: Iterable[str]) -> list[BlockHash]:
    """Inverse of `to_hex`; raises ValueError naming a malformed hash."""
    out: list[BlockHash] = []
    for text in hex_hashes:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"block hash {text!r} is not hexadecimal") from None
        if len(raw) != 32:
            raise ValueError(f"block hash {text!r} is {len(raw)} bytes; expected 32")
        out.append(BlockHash(raw))
    return out


HASH_BYTES = 32  # a SHA-256 digest


def pack_hashes(block_hashes: Iterable[BlockHash]) -> str:
    """One base64 string of the concatenated digests: the chain on a JSON wire, 44 characters
    per 32-byte hash instead of 66 (quoted hex), and one string for the decoder to split."""
    return base64.b64encode(b"".join(block_hashes)).decode("ascii")


def unpack_hashes(packed: str) -> list[BlockHash]:
    """Inverse of `pack_hashes`; raises ValueError naming a malformed chain."""
    try:
        raw = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"block hashes {packed[:60]!r} are not base64") from None
    if len(raw) % HASH_BYTES:
        raise ValueError(
            f"block hashes decode to {len(raw):,} bytes, not a multiple of {HASH_BYTES}"
        )
    return [BlockHash(raw[i : i + HASH_BYTES]) for i in range(0, len(raw), HASH_BYTES)]
