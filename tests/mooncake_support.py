"""Random Mooncake-format traces for tests: chained hash ids with realistic sharing.

A trace line is ``{"timestamp", "input_length", "output_length", "hash_ids"}``. Ids are
chained as in the real trace (an id stands for its whole prefix): a request either starts a
new conversation or continues an earlier request's ids cut at a random place, then appends
fresh ids. Some requests also reuse an existing id after a different prefix, which a real
trace never does, so tests see that an id's blocks depend on what comes before it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson

ID_TOKENS = 512


def random_mooncake_records(rng: random.Random, num_requests: int) -> list[dict[str, Any]]:
    """`num_requests` trace records; timestamps non-decreasing, with ties."""
    records: list[dict[str, Any]] = []
    next_id = 0
    timestamp = 0
    for _ in range(num_requests):
        if records and rng.random() < 0.7:
            earlier = rng.choice(records)["hash_ids"]
            ids = list(earlier[: rng.randint(1, len(earlier))])
        else:
            ids = []
        for _ in range(rng.randint(0 if ids else 1, 5)):
            if next_id and rng.random() < 0.1:
                ids.append(rng.randrange(next_id))  # an old id after a new prefix
            else:
                ids.append(next_id)
                next_id += 1
        input_length = rng.randint(ID_TOKENS * (len(ids) - 1) + 1, ID_TOKENS * len(ids))
        timestamp += rng.choice((0, rng.randint(1, 3_000)))
        records.append(
            {
                "timestamp": timestamp,
                "input_length": input_length,
                "output_length": rng.randint(0, 400),
                "hash_ids": ids,
            }
        )
    return records


def write_mooncake_trace(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path
