"""Property tests: random request streams through the batched scheduler, checked step by step
against its invariants (and against a recount that ignores its bookkeeping)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.errors import RequestRejected
from kvqueue.gpu.batched_gpu import BatchedGpu
from kvqueue.gpu.events import replay
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.scheduler import EngineRequest, SchedulerConfig

# A request: a prompt of blocks from a small alphabet (shared prefixes are common), a tail of
# 0..15 extra tokens, an output length; and how many steps pass before the next arrives.
requests = st.tuples(
    st.lists(st.sampled_from("abcd"), min_size=0, max_size=6),
    st.integers(0, 15),
    st.integers(0, 40),
    st.integers(0, 4),
)


def make(index: int, labels, tail: int, outputs: int) -> Request | None:
    tokens = [ord(label) for label in labels for _ in range(16)] + [7] * tail
    if not tokens:
        return None
    return Request(f"r{index}", len(tokens), tuple(hash_token_blocks(tokens)), outputs)


def queued_prefill(running: list[EngineRequest], waiting) -> int:
    """The signal's definition, recounted from scratch."""
    total = sum(r.num_tokens for r in waiting)
    return total + sum(r.num_tokens - r.num_computed for r in running if not r.is_decoding)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.lists(requests, min_size=1, max_size=25),
    num_blocks=st.integers(3, 40),
    budget=st.integers(1, 96),
    max_seqs=st.integers(1, 6),
)
def test_scheduler_invariants_hold_on_random_streams(stream, num_blocks, budget, max_seqs):
    max_seqs = min(max_seqs, budget)
    gpu = BatchedGpu(get_preset(num_blocks=num_blocks), config=SchedulerConfig(budget, max_seqs))
    scheduler, cache = gpu.scheduler, gpu.cache
    submitted: list[EngineRequest] = []
    ended: Counter[str] = Counter()
    events = []
    pending = list(enumerate(stream))
    steps = 0
    while pending or scheduler.has_work:
        while pending:  # arrivals before this step
            index, (labels, tail, outputs, gap) = pending[0]
            pending.pop(0)
            request = make(index, labels, tail, outputs)
            if request is not None:
                try:
                    submitted.append(gpu.submit(request))
                except RequestRejected:
                    ended[request.request_id] += 1
            if gap:
                break
        if not scheduler.has_work:
            continue
        step = scheduler.schedule()
        steps += 1
        assert steps < 10_000, "no progress"
        # A step computes at most the budget, runs at most max_num_seqs.
        assert sum(c.num_tokens for c in step.chunks) <= budget
        assert len(scheduler.running) <= max_seqs
        # Slots never exceed the cache; a running request's blocks are pinned and cached.
        assert cache.num_used_slots <= cache.num_blocks
        for request in scheduler.running:
            assert request.table.num_slots * 16 >= request.num_computed
            for block_hash in request.table.block_hashes:
                assert cache.ref_count(block_hash) > 0
        for request in scheduler.waiting:
            assert request.table.num_slots == 0
        assert scheduler.num_queued_prefill_tokens == queued_prefill(
            scheduler.running, scheduler.waiting
        )
        outcome = scheduler.complete(step)
        for request in outcome.finished:
            ended[request.request.request_id] += 1
            assert request.num_output == request.num_output_target
        events += gpu.take_events()
        assert replay(events) == cache.cached_hashes()

    # Every request ended exactly once; everything was released.
    assert all(count == 1 for count in ended.values())
    assert {r.request.request_id for r in submitted} <= set(ended)
    assert cache.num_active_blocks == 0
    assert scheduler.signals().kv_usage == 0.0
