"""Trace replay: Mooncake (prefix-sharing) and Azure LLM inference (no prefix info) traces.

Traces carry lengths and, for Mooncake, ids of shared 512-token blocks — never token ids. Each
request's 16-token block hashes are derived with `kvqueue.gpu.hashing` from the trace's ids, so
requests share exactly the block hashes the trace says they share:

- Mooncake: the ids are chained 512-token *units*. Id ``k`` after parent digest ``p`` (the root
  hash of the seed and extra keys for a first id) has the digest ``d = hash_block(p,
  (MOONCAKE_TAG, k_lo, k_hi))`` — one SHA-256 per unit, chained over the ids (`unit_digest`,
  memoized per ``(p, k)`` in `MooncakeExpander`) — and expands to 32 sub-blocks whose hashes
  are derived, not hashed: sub-block ``j`` is ``d[:28] || j`` (j as 4 little-endian bytes).
  Equal block hash ⇔ equal unit digest and position ⇔ equal whole prefix (equal ids up to
  this one, equal position in it), across every request of the trace. Two requests whose
  ``hash_ids`` share their first ``n`` ids share exactly their first ``32 × n`` block hashes
  (the ids of a Mooncake trace are themselves chained: an id stands for its whole prefix).
- Azure: the trace says nothing about sharing, so the request on line ``i`` gets its own
  pseudo-token blocks ``(AZURE_TAG, i_lo, i_hi, j, 0, …)``; no two requests of a file share a
  block.

Every reader returns requests in file order with ``token_ids = None`` and ``arrival_ms`` relative
to the earliest timestamp read. A malformed line or file raises `InputFormatError` whose message
starts with ``<file>:<line>:``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from kvqueue.errors import InputFormatError
from kvqueue.gpu.hashing import BLOCK_SIZE, DEFAULT_HASH_SEED, BlockHash, chain, root_hash
from kvqueue.gpu.request import Request

MOONCAKE_ID_TOKENS = 512  # tokens covered by one Mooncake hash id
SUB_BLOCKS_PER_ID = MOONCAKE_ID_TOKENS // BLOCK_SIZE  # 32
MOONCAKE_TAG = 0x4D4F4F4E  # "MOON": first pseudo-token of every Mooncake block
AZURE_TAG = 0x415A5552  # "AZUR": first pseudo-token of every Azure block
MAX_ID = (1 << 64) - 1  # ids are packed into two 32-bit pseudo-tokens
UNIT_PREFIX_BYTES = 28  # of a unit digest, in each of its sub-block hashes (+ 4 position bytes)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
NUM_FIT_EXAMPLES = 5
_PADDING = (0,) * (BLOCK_SIZE - 4)


# -- reading helpers (shared with kvqueue.workloads.synthetic) --------------------------------
def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number from 1, text without the line break)``; bad UTF-8 names its line."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputFormatError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
            yield lineno, text.rstrip("\r\n")


def parse_json_object(path: str | Path, lineno: int, text: str) -> dict[str, Any]:
    """One JSONL line as a dict, or `InputFormatError` naming the file and line."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InputFormatError(f"{path}:{lineno}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFormatError(
            f"{path}:{lineno}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def field_int(
    path: str | Path, lineno: int, data: Mapping[str, Any], key: str, minimum: int = 0
) -> int:
    """``data[key]`` as an int >= `minimum` (bools and floats with a fraction are refused)."""
    if key not in data:
        raise InputFormatError(f"{path}:{lineno}: missing field {key!r}")
    return as_int(path, lineno, key, data[key], minimum)


def as_int(path: str | Path, lineno: int, key: str, value: Any, minimum: int = 0) -> int:
    """A JSON `value` as an int >= `minimum` (integral floats pass; bools and strings do not)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputFormatError(
            f"{path}:{lineno}: {key} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def text_int(path: str | Path, lineno: int, key: str, text: str, minimum: int = 0) -> int:
    """A CSV field as an int >= `minimum`."""
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise InputFormatError(
            f"{path}:{lineno}: {key} must be an integer >= {minimum}, got {text!r}"
        )
    return value


def field_number(path: str | Path, lineno: int, data: Mapping[str, Any], key: str) -> float:
    """``data[key]`` as a finite float >= 0."""
    if key not in data:
        raise InputFormatError(f"{path}:{lineno}: missing field {key!r}")
    return as_number(path, lineno, key, data[key])


def as_number(path: str | Path, lineno: int, key: str, value: Any) -> float:
    """`value` as a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputFormatError(f"{path}:{lineno}: {key} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InputFormatError(f"{path}:{lineno}: {key} must be finite and >= 0, got {value!r}")
    return float(value)


def _check_scale(length_scale: float) -> None:
    if not (math.isfinite(length_scale) and length_scale > 0):
        raise ValueError(f"length_scale must be a positive number, got {length_scale!r}")


def pseudo_blocks(tag: int, key: int, num_blocks: int) -> list[tuple[int, ...]]:
    """Blocks j < `num_blocks` of 16 pseudo-tokens ``(tag, key_lo, key_hi, j, 0, …)``.

    Distinct (tag, key, j) give distinct token blocks, hence distinct hashes under any parent.
    """
    head = (tag, key & 0xFFFFFFFF, key >> 32)
    return [(*head, j, *_PADDING) for j in range(num_blocks)]


# -- Mooncake --------------------------------------------------------------------------------
def sub_blocks_per_id(length_scale: float) -> int:
    """Blocks each hash id expands to at this scale: ``max(1, round(32 × length_scale))``."""
    _check_scale(length_scale)
    return max(1, round(SUB_BLOCKS_PER_ID * length_scale))


def scaled_input_length(input_length: int, length_scale: float) -> int:
    """The input length at the *effective* scale ``sub_blocks_per_id / 32`` (at least 1).

    Using the effective scale (e.g. 3/32 = 0.09375 for 0.1) keeps every id's share of a prompt
    intact, so the last id is cut at the same relative place as in the original trace.
    """
    if length_scale == 1.0:
        return input_length
    blocks = sub_blocks_per_id(length_scale)
    return max(1, round(input_length * blocks / SUB_BLOCKS_PER_ID))


_UNIT_KEY = struct.Struct("<IQ")  # the pseudo-tokens (MOONCAKE_TAG, k_lo, k_hi), packed


def unit_digest(parent: BlockHash, hash_id: int) -> BlockHash:
    """The chained digest of Mooncake id `hash_id` after `parent` (the previous id's digest):
    ``hash_block(parent, (MOONCAKE_TAG, k_lo, k_hi))``, with the tokens packed in one call."""
    return BlockHash(hashlib.sha256(parent + _UNIT_KEY.pack(MOONCAKE_TAG, hash_id)).digest())


class _SubBlockDerivation:
    """Derives a unit's `num_blocks` sub-block hashes ``digest[:28] || j`` in two C calls:
    ``prefix.join(("", p_0, p_1, …))`` lays out ``prefix p_0 prefix p_1 …``, and one struct
    unpack cuts it into the 32-byte hashes. No Python code or hashing runs per sub-block."""

    def __init__(self, num_blocks: int) -> None:
        self._pieces = (b"", *(j.to_bytes(4, "little") for j in range(num_blocks)))
        self._unpack = struct.Struct("32s" * num_blocks).unpack

    def __call__(self, digest: BlockHash) -> tuple[BlockHash, ...]:
        return self._unpack(digest[:UNIT_PREFIX_BYTES].join(self._pieces))


class MooncakeExpander:
    """Expands chains of Mooncake hash ids into 16-token block hashes, memoized per unit.

    Invariant: ``self._units[(parent, hash_id)]`` holds the digest of `hash_id` after the
    digest `parent` and all `blocks_per_id` sub-block hashes of that unit. Requests sharing a
    unit share its hash objects; a request needing fewer (its last, cut id) takes a prefix.
    """

    def __init__(
        self,
        blocks_per_id: int = SUB_BLOCKS_PER_ID,
        hash_seed: str = DEFAULT_HASH_SEED,
        extra_keys: Sequence[str] = (),
    ) -> None:
        if blocks_per_id < 1:
            raise ValueError(f"blocks_per_id must be >= 1, got {blocks_per_id!r}")
        self.blocks_per_id = blocks_per_id
        self.root = root_hash(hash_seed, extra_keys)
        self._derive = _SubBlockDerivation(blocks_per_id)
        self._units: dict[tuple[BlockHash, int], tuple[BlockHash, tuple[BlockHash, ...]]] = {}

    def _unit(self, parent: BlockHash, hash_id: int) -> tuple[BlockHash, tuple[BlockHash, ...]]:
        digest = unit_digest(parent, hash_id)
        unit = self._units[(parent, hash_id)] = (digest, self._derive(digest))
        return unit

    def expand(self, hash_ids: Sequence[int], num_blocks: int) -> tuple[BlockHash, ...]:
        """The first `num_blocks` block hashes of the chain `hash_ids`."""
        num_units = -(-num_blocks // self.blocks_per_id)
        assert len(hash_ids) >= num_units, "caller checked the ids cover the input"
        units = self._units
        out: list[BlockHash] = []
        parent = self.root
        for hash_id in hash_ids[:num_units]:
            unit = units.get((parent, hash_id)) or self._unit(parent, hash_id)
            parent = unit[0]
            out += unit[1]
        del out[num_blocks:]
        return tuple(out)


def _mooncake_hash_ids(path: str | Path, lineno: int, data: Mapping[str, Any]) -> list[int]:
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


def _mooncake_request(
    path: str | Path,
    lineno: int,
    data: Mapping[str, Any],
    expander: MooncakeExpander,
    length_scale: float,
    request_id: str,
) -> tuple[float, Request]:
    """Parse one record into (timestamp ms, request with arrival_ms still absolute)."""
    timestamp = field_number(path, lineno, data, "timestamp")
    input_length = field_int(path, lineno, data, "input_length", minimum=1)
    output_length = field_int(path, lineno, data, "output_length", minimum=0)
    hash_ids = _mooncake_hash_ids(path, lineno, data)
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


def _relative_arrivals(stamped: list[tuple[float, Request]]) -> list[Request]:
    """Requests in file order with arrival_ms = timestamp − earliest timestamp."""
    if not stamped:
        return []
    first = min(stamp for stamp, _ in stamped)
    return [replace(request, arrival_ms=stamp - first) for stamp, request in stamped]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def read_mooncake(
    path: str | Path,
    limit: int | None = None,
    length_scale: float = 1.0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    id_prefix: str = "mooncake",
) -> list[Request]:
    """Read a Mooncake JSONL trace (`timestamp` ms, `input_length`, `output_length`, `hash_ids`).

    Each hash id covers 512 tokens and expands to 32 blocks of 16 tokens; the prompt keeps only
    the full blocks within `input_length` (a partial last block is not hashed), so
    ``num_blocks == input_length // 16``. `output_length` becomes `max_tokens`. A record needs at
    least ``ceil(input_length / 512)`` ids; surplus ids are ignored.

    `length_scale` shrinks prompts while keeping the sharing structure: every id expands to
    ``b = max(1, round(32 × length_scale))`` blocks instead of 32 and the input length becomes
    ``max(1, round(input_length × b / 32))``. All ids are kept, so two requests sharing their
    first n ids share exactly ``b × n`` blocks and the ideal hit rate is nearly unchanged; the
    effective scale is ``b / 32`` (0.1 → 3/32). Request ids are ``<id_prefix>-<line number>``.
    Blank lines are skipped; an empty file is an error.
    """
    _check_limit(limit)
    expander = MooncakeExpander(sub_blocks_per_id(length_scale), hash_seed, extra_keys)
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
        stamped.append(_mooncake_request(path, lineno, data, expander, length_scale, request_id))
    if not saw_line and limit != 0:
        raise InputFormatError(f"{path}:1: the trace is empty")
    return _relative_arrivals(stamped)


# -- Azure -----------------------------------------------------------------------------------
def parse_azure_timestamp(path: str | Path, lineno: int, text: str) -> float:
    """``"2023-11-16 18:15:46.6805900"`` → milliseconds since the Unix epoch (naive, as UTC).

    The fraction may have any number of digits (the trace uses 7, more than `datetime` takes).
    """
    whole, _, fraction = text.strip().partition(".")
    try:
        moment = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
        if fraction and not fraction.isdigit():
            raise ValueError(fraction)
    except ValueError:
        raise InputFormatError(
            f"{path}:{lineno}: TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fraction]'"
        ) from None
    seconds = (moment - datetime(1970, 1, 1)).total_seconds()
    return seconds * 1000.0 + (float(f"0.{fraction}") * 1000.0 if fraction else 0.0)


def _azure_blocks(root: BlockHash, index: int, num_blocks: int) -> tuple[BlockHash, ...]:
    """A chain of blocks no other request has: pseudo-tokens carry the request's index."""
    return tuple(chain(root, pseudo_blocks(AZURE_TAG, index, num_blocks)))


def _azure_columns(path: str | Path, header: Sequence[str] | None) -> list[int]:
    """Positions of `AZURE_COLUMNS` in the header row (line 1)."""
    if not header:
        raise InputFormatError(f"{path}:1: the trace is empty (expected a CSV header)")
    names = [name.strip() for name in header]
    missing = [name for name in AZURE_COLUMNS if name not in names]
    if missing:
        raise InputFormatError(
            f"{path}:1: CSV header lacks {', '.join(missing)}; "
            f"expected {', '.join(AZURE_COLUMNS)}, got {', '.join(names)}"
        )
    return [names.index(name) for name in AZURE_COLUMNS]


def read_azure(
    path: str | Path,
    limit: int | None = None,
    length_scale: float = 1.0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    id_prefix: str = "azure",
) -> list[Request]:
    """Read an Azure LLM inference trace CSV (`TIMESTAMP`, `ContextTokens`, `GeneratedTokens`).

    The trace has no prefix information, so every request gets blocks of its own (no sharing):
    a control workload with real lengths and arrival times. ``num_blocks == ContextTokens // 16``
    (after ``max(1, round(ContextTokens × length_scale))`` when scaled); `GeneratedTokens`
    becomes `max_tokens`; arrivals are relative to the earliest timestamp read. Request ids are
    ``<id_prefix>-<line number>`` (the header is line 1). Blank lines are skipped; a file
    without a header or without rows is an error.
    """
    _check_limit(limit)
    _check_scale(length_scale)
    root = root_hash(hash_seed, extra_keys)
    stamped: list[tuple[float, Request]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            columns = _azure_columns(path, header)
            for row in reader:
                if limit is not None and len(stamped) >= limit:
                    break
                if not row:
                    continue
                if len(row) != len(header or ()):
                    raise InputFormatError(
                        f"{path}:{reader.line_num}: expected {len(header or ())} fields "
                        f"like the header, got {len(row)}: {row!r}"
                    )
                values = [row[i] for i in columns]
                request_id = f"{id_prefix}-{reader.line_num}"
                stamped.append(
                    _azure_request(path, reader.line_num, values, root, length_scale, request_id)
                )
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputFormatError(f"{path}:{reader.line_num}: unreadable CSV ({exc})") from None
    if not stamped and limit != 0:
        raise InputFormatError(f"{path}:2: the trace has a header but no requests")
    return _relative_arrivals(stamped)


def _azure_request(
    path: str | Path,
    lineno: int,
    values: Sequence[str],
    root: BlockHash,
    length_scale: float,
    request_id: str,
) -> tuple[float, Request]:
    """One row's (TIMESTAMP, ContextTokens, GeneratedTokens) as (epoch ms, request)."""
    stamp_text, context_text, generated_text = values
    timestamp = parse_azure_timestamp(path, lineno, stamp_text)
    context = text_int(path, lineno, "ContextTokens", context_text, minimum=1)
    generated = text_int(path, lineno, "GeneratedTokens", generated_text, minimum=0)
    if length_scale != 1.0:
        context = max(1, round(context * length_scale))
    blocks = _azure_blocks(root, lineno, context // BLOCK_SIZE)
    return timestamp, Request(request_id, context, blocks, generated, timestamp)


# -- fitting a preset ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FitReport:
    """Which requests a preset can never serve, by the rules of `SimulatedGpu.check_admissible`.

    A request does not fit if ``prompt >= max_context_tokens``, or ``prompt + max_tokens >
    max_context_tokens``, or ``ceil((prompt + max_tokens) / 16) > num_blocks``. A missing
    `max_tokens` counts as 0 output tokens (the GPU caps an open-ended decode at the context).
    `examples` holds up to five ``(request_id, reason)`` pairs in input order.
    """

    num_requests: int
    num_unfit: int
    num_over_context: int
    num_over_blocks: int
    max_prompt_tokens: int
    examples: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests,
            "num_unfit": self.num_unfit,
            "num_over_context": self.num_over_context,
            "num_over_blocks": self.num_over_blocks,
            "max_prompt_tokens": self.max_prompt_tokens,
            "examples": [list(pair) for pair in self.examples],
        }


def over_context(request: Request, max_context_tokens: int) -> bool:
    """The prompt, or the prompt plus its `max_tokens`, exceeds the context window."""
    total = request.num_prompt_tokens + (request.max_tokens or 0)
    return request.num_prompt_tokens >= max_context_tokens or total > max_context_tokens


def needed_blocks(request: Request) -> int:
    """KV slots for the prompt and its `max_tokens` (0 when unknown), partial blocks included."""
    return math.ceil((request.num_prompt_tokens + (request.max_tokens or 0)) / BLOCK_SIZE)


def unfit_reason(request: Request, max_context_tokens: int, num_blocks: int) -> str:
    """Why `request` can never be served by the preset, or "" if it fits."""
    reasons = []
    if over_context(request, max_context_tokens):
        reasons.append(
            f"prompt of {request.num_prompt_tokens:,} + {request.max_tokens or 0:,} output "
            f"tokens exceeds the {max_context_tokens:,}-token context"
        )
    if needed_blocks(request) > num_blocks:
        reasons.append(
            f"needs {needed_blocks(request):,} KV blocks; the cache holds {num_blocks:,}"
        )
    return "; ".join(reasons)


def fits_report(requests: Sequence[Request], max_context_tokens: int, num_blocks: int) -> FitReport:
    """Count the requests that cannot fit a preset's context or block cache (see `FitReport`)."""
    unfit = [
        (r.request_id, reason)
        for r in requests
        if (reason := unfit_reason(r, max_context_tokens, num_blocks))
    ]
    return FitReport(
        num_requests=len(requests),
        num_unfit=len(unfit),
        num_over_context=sum(over_context(r, max_context_tokens) for r in requests),
        num_over_blocks=sum(needed_blocks(r) > num_blocks for r in requests),
        max_prompt_tokens=max((r.num_prompt_tokens for r in requests), default=0),
        examples=tuple(unfit[:NUM_FIT_EXAMPLES]),
    )
