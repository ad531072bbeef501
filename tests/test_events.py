"""Cache events: emitted in order, drained once, JSON on the wire, replayable."""

from __future__ import annotations

import orjson
import pytest

from kvqueue import keys
from kvqueue.gpu.cache import BlockCache
from kvqueue.gpu.events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    decode_event,
    encode_event,
    event_from_dict,
    event_to_dict,
    replay,
)


def test_stored_removed_and_cleared_are_emitted_in_order(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0", "a1", "a2")
    b = make_hashes("a0", "b1")

    cache.release(cache.allocate(a))
    cache.release(cache.allocate(b))  # a0 hits; b1 is stored under a0
    cache.release(cache.allocate(make_hashes("c0")))  # 0 free: evicts a2, stores c0
    cache.clear()
    assert cache.take_events() == [
        BlocksStored(tuple(a), None),
        BlocksStored((b[1],), a[0]),
        BlocksRemoved((a[2],)),
        BlocksStored((make_hashes("c0")[0],), None),
        AllBlocksCleared(),
    ]


def test_take_events_drains_so_each_event_is_taken_once(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0")
    cache.allocate(a)
    assert cache.take_events() == [BlocksStored(tuple(a), None)]
    assert cache.take_events() == []


def test_hits_and_releases_emit_no_events(make_hashes):
    cache = BlockCache(4)
    a = make_hashes("a0", "a1")
    cache.release(cache.allocate(a))
    cache.take_events()
    cache.release(cache.allocate(a))
    assert cache.take_events() == []


def test_event_wire_format_is_type_and_hex_hashes(make_hashes):
    a = make_hashes("a0", "a1")
    assert event_to_dict(BlocksStored(tuple(a), None)) == {
        "type": "stored",
        "hashes": [a[0].hex(), a[1].hex()],
        "parent": None,
    }
    assert event_to_dict(BlocksStored((a[1],), a[0]))["parent"] == a[0].hex()
    assert event_to_dict(BlocksRemoved((a[1],))) == {"type": "removed", "hashes": [a[1].hex()]}
    assert event_to_dict(AllBlocksCleared()) == {"type": "cleared"}
    assert orjson.loads(encode_event(AllBlocksCleared())) == {"type": "cleared"}


def _some_events(make_hashes) -> tuple[BlockCache, list]:
    cache = BlockCache(3)
    for labels in (("a0", "a1"), ("a0", "b1"), ("c0", "c1"), ("a0",)):
        cache.release(cache.allocate(make_hashes(*labels)))
    cache.clear()
    cache.release(cache.allocate(make_hashes("d0", "d1")))
    events = cache.take_events()
    assert {type(e) for e in events} == {BlocksStored, BlocksRemoved, AllBlocksCleared}
    return cache, events


def test_every_event_round_trips_through_json(make_hashes):
    _, events = _some_events(make_hashes)
    assert [decode_event(encode_event(e)) for e in events] == events
    assert [decode_event(encode_event(e).decode()) for e in events] == events


@pytest.mark.redis
def test_event_json_round_trips_through_a_real_redis_stream(make_hashes, redis_client):
    cache, events = _some_events(make_hashes)
    stream = keys.events()
    for event in events:
        redis_client.xadd(stream, {"worker": "worker-0", "event": encode_event(event)})
    entries = redis_client.xrange(stream)
    decoded = [decode_event(fields[b"event"]) for _, fields in entries]
    assert decoded == events
    assert replay(decoded) == cache.cached_hashes()


def test_event_json_round_trips_through_a_fake_redis_stream(make_hashes, fake_redis):
    cache, events = _some_events(make_hashes)
    for event in events:
        fake_redis.xadd("kvq:events", {"event": encode_event(event)})
    decoded = [decode_event(fields[b"event"]) for _, fields in fake_redis.xrange("kvq:events")]
    assert decoded == events
    assert replay(decoded) == cache.cached_hashes()


def test_replay_applies_stored_removed_and_cleared_in_order(make_hashes):
    a = make_hashes("a0", "a1")
    c = make_hashes("c0")
    events = [BlocksStored(tuple(a), None), BlocksRemoved((a[1],))]
    assert replay(events) == {a[0]}
    assert replay([*events, AllBlocksCleared(), BlocksStored(tuple(c), None)]) == set(c)
    assert replay([BlocksRemoved((a[0],))], cached={a[0], c[0]}) == {c[0]}


def test_unknown_event_type_is_rejected_naming_it():
    with pytest.raises(ValueError, match="'evicted'"):
        event_from_dict({"type": "evicted", "hashes": []})
    with pytest.raises(ValueError, match="None"):
        decode_event(b"{}")


def test_malformed_hash_in_an_event_is_rejected_naming_it():
    with pytest.raises(ValueError, match="'xyz'"):
        decode_event(b'{"type": "removed", "hashes": ["xyz"]}')


def test_non_event_cannot_be_encoded():
    with pytest.raises(TypeError, match="not a cache event"):
        encode_event("stored")  # type: ignore[arg-type]
