"""Pins every Redis key kvqueue writes: renaming one breaks every deployed producer/worker pair
and every `redis-cli` recipe, so a change here must be deliberate."""

from __future__ import annotations

import inspect

import pytest

from kvqueue import keys

HEX = "ab" * 32
RAW = bytes.fromhex(HEX)

# (function, arguments, key with the default prefix)
PREFIXED_KEYS = [
    (keys.slots, (), "kvq:slots"),
    (keys.slot_blocks, (), "kvq:slots:blocks"),
    (keys.slots_next, (), "kvq:slots:next"),
    (keys.slots_cursor, (), "kvq:slots:cursor"),
    (keys.slots_dead, (), "kvq:slots:dead"),
    (keys.slots_sweeping, (), "kvq:slots:sweeping"),
    (keys.slots_pending, (), "kvq:slots:pending"),
    (keys.worker_info, ("worker-0",), "kvq:worker:worker-0:info"),
    (keys.worker_generation, ("worker-0",), "kvq:worker:worker-0:generation"),
    (keys.worker_jobs, ("worker-0",), "kvq:worker:worker-0:jobs"),
    (keys.worker_routed, ("worker-0",), "kvq:worker:worker-0:routed"),
    (keys.routed, (), "kvq:routed"),
    (keys.routed_clock, (), "kvq:routed:clock"),
    (keys.workers, (), "kvq:workers"),
    (keys.load, (), "kvq:load"),
    (keys.load_tokens, (), "kvq:load:tokens"),
    (keys.load_work, (), "kvq:load:work"),
    (keys.load_since, (), "kvq:load:since"),
    (keys.usage, (), "kvq:usage"),
    (keys.capacity, (), "kvq:capacity"),
    (keys.engine_signals, (), "kvq:signals"),
    (keys.output_stats, (), "kvq:stats:output"),
    (keys.round_robin, (), "kvq:rr"),
    (keys.events, (), "kvq:events"),
    (keys.results, ("20261126-120000-abcdef",), "kvq:results:20261126-120000-abcdef"),
    (keys.run, ("20261126-120000-abcdef",), "kvq:run:20261126-120000-abcdef"),
    (keys.run_reported, ("20261126-120000-abcdef",), "kvq:run:20261126-120000-abcdef:reported"),
    (keys.run_engine, ("20261126-120000-abcdef",), "kvq:run:20261126-120000-abcdef:engine"),
]

# Names that are not keys of their own: hash fields and RQ queue names.
UNPREFIXED = [
    (keys.pending_field, ("7",), "p7"),
    (keys.queue_name, ("worker-3",), "worker-3"),
    (keys.worker_name, (12,), "worker-12"),
]


@pytest.mark.parametrize(
    ("build", "args", "expected"), PREFIXED_KEYS, ids=lambda v: getattr(v, "__name__", None)
)
def test_key_format_with_the_default_prefix(build, args, expected: str) -> None:
    assert keys.DEFAULT_PREFIX == "kvq:"
    assert build(*args) == expected


@pytest.mark.parametrize(
    ("build", "args", "expected"), PREFIXED_KEYS, ids=lambda v: getattr(v, "__name__", None)
)
def test_key_format_with_a_custom_prefix(build, args, expected: str) -> None:
    assert build(*args, prefix="lab7:") == "lab7:" + expected.removeprefix("kvq:")


@pytest.mark.parametrize(
    ("build", "args", "expected"), UNPREFIXED, ids=lambda v: getattr(v, "__name__", None)
)
def test_fields_and_queue_names_carry_no_prefix(build, args, expected: str) -> None:
    assert build(*args) == expected
    assert "prefix" not in inspect.signature(build).parameters


# The tree's node keys are binary: the prefix, "n:", the raw 32-byte hash.
BINARY_KEYS = [
    (keys.node, (RAW,), b"kvq:n:" + RAW),
    (keys.node_prefix, (), b"kvq:n:"),
    (keys.node_pattern, (), b"kvq:n:*"),
]


@pytest.mark.parametrize(
    ("build", "args", "expected"), BINARY_KEYS, ids=lambda v: getattr(v, "__name__", None)
)
def test_node_key_format_with_the_default_and_a_custom_prefix(build, args, expected) -> None:
    assert build(*args) == expected
    assert build(*args, prefix="lab7:") == b"lab7:" + expected.removeprefix(b"kvq:")


def test_a_node_key_is_the_node_prefix_followed_by_the_raw_hash() -> None:
    assert keys.node(RAW, "p:") == keys.node_prefix("p:") + RAW
    assert len(keys.node(RAW)) == len("kvq:n:") + 32


def test_the_node_pattern_escapes_glob_characters_of_the_prefix() -> None:
    assert keys.node_pattern("lab[1]*:") == b"lab\\[1\\]\\*:n:*"


def test_every_key_function_is_pinned_here() -> None:
    public = {
        name
        for name, value in vars(keys).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }
    pinned = {build.__name__ for build, _, _ in PREFIXED_KEYS + UNPREFIXED + BINARY_KEYS}
    assert public - pinned == set(), "new key builders need a pinned format in test_keys.py"
    assert pinned - public == set()


def test_every_prefixed_key_is_distinct() -> None:
    built = [build(*args) for build, args, _ in PREFIXED_KEYS]
    assert len(set(built)) == len(built)
