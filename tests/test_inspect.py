"""`kvqueue inspect`: the binary Redis tree decoded into worker names and hex hashes."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from kvqueue import keys
from kvqueue.cli import main
from kvqueue.routing.inspect import parse_hash, read_slots, read_tree, summarize
from kvqueue.routing.redis_index import RedisIndex

PENDING_TTL_MS = 60_000


def test_the_tree_reads_back_as_worker_names_hashes_and_pending_marks(make_hashes) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index = RedisIndex(client, "kvq:")
    chain = make_hashes("sys", "a", "b")
    index.add("worker-0", chain)
    index.add("worker-1", chain[:1])
    index.mark_pending("worker-2", chain[:2], PENDING_TTL_MS)

    nodes = {node.block_hash: node for node in read_tree(client, "kvq:")}

    assert set(nodes) == set(chain)
    assert nodes[chain[0]].stored_by == ("worker-0", "worker-1")
    assert nodes[chain[2]].stored_by == ("worker-0",)
    assert set(nodes[chain[1]].pending) == {"worker-2"}
    summary = summarize(list(nodes.values()))
    assert summary.stored_by_worker == {"worker-0": 3, "worker-1": 1}
    assert summary.pending_by_worker == {"worker-2": 2}
    assert summary.num_holders == {1: 2, 2: 1}


def test_a_retired_slot_is_reported_apart_until_the_sweep_removes_it(make_hashes) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index = RedisIndex(client, "kvq:")
    chain = make_hashes("sys", "a")
    index.add("worker-0", chain)
    index.add("worker-1", chain)
    old_slot = client.hget(keys.slots("kvq:"), "worker-0").decode()
    client.sadd(keys.slots_dead("kvq:"), old_slot)  # retired, as `clear` does, before a sweep
    client.hdel(keys.slots("kvq:"), "worker-0")

    before = read_tree(client, "kvq:")
    assert read_slots(client, "kvq:").retired == {old_slot}
    assert all(n.stored_by == ("worker-1",) and n.retired_slots == (old_slot,) for n in before)

    assert index.sweep()
    assert all(n.retired_slots == () for n in read_tree(client, "kvq:"))
    assert read_slots(client, "kvq:").retired == frozenset()


def test_a_forgotten_workers_pending_marks_are_reported_apart_until_the_sweep(make_hashes) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index = RedisIndex(client, "kvq:")
    chain = make_hashes("sys", "a")
    index.add("worker-0", chain)
    index.mark_pending("worker-1", chain, PENDING_TTL_MS)
    field = keys.pending_field(client.hget(keys.slots_pending("kvq:"), "worker-1").decode())
    client.sadd(keys.slots_dead("kvq:"), field)  # retired, as `forget` does, before a sweep
    client.hdel(keys.slots_pending("kvq:"), "worker-1")

    before = read_tree(client, "kvq:")
    assert read_slots(client, "kvq:").retired == {field}
    assert all(n.pending == {} and n.retired_slots == (field,) for n in before)

    assert index.sweep()
    assert all(n.retired_slots == () for n in read_tree(client, "kvq:"))


@pytest.mark.parametrize(
    ("text", "message"),
    [("zz", "'zz' is not hex"), ("ab" * 16, "has 16 bytes; a block hash has 32")],
)
def test_a_bad_block_hash_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hash(text)


@pytest.mark.redis
def test_kvqueue_inspect_prints_the_summary_and_a_node(
    redis_url: str, make_hashes, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    index = RedisIndex(client, "lab:")
    chain = make_hashes("sys", "a")
    index.add("worker-0", chain)
    index.mark_pending("worker-1", chain[:1], PENDING_TTL_MS)

    assert main(["inspect", "--redis-url", redis_url, "--prefix", "lab:", "summary"]) == 0
    summary = capsys.readouterr().out
    assert (
        main(["inspect", "--redis-url", redis_url, "--prefix", "lab:", "node", chain[0].hex()]) == 0
    )
    node = capsys.readouterr().out
    absent = make_hashes("never", "stored")[1].hex()
    assert main(["inspect", "--redis-url", redis_url, "--prefix", "lab:", "node", absent]) == 0
    missing = capsys.readouterr().out

    assert "nodes: 2;" in summary
    rows = {
        line.split()[0]: line.split()[1:]
        for line in summary.splitlines()
        if line.startswith("worker-")
    }
    assert rows == {"worker-0": ["1", "no", "2", "2", "0"], "worker-1": ["-", "no", "0", "0", "1"]}
    lines = node.splitlines()
    assert lines[:2] == [f"block {chain[0].hex()}", "  stored by: worker-0"]
    assert lines[2].startswith("  pending on worker-1: expires in ")
    assert lines[3].startswith("  key TTL: none (stored); memory: ")
    assert "not in the tree" in missing


def test_kvqueue_inspect_node_refuses_a_bad_hash_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["inspect", "--redis-url", "redis://127.0.0.1:1/0", "node", "xyz"]) == 2
    assert "block hash 'xyz' is not hex" in capsys.readouterr().err
