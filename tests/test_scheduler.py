"""The batched engine's scheduler on tiny hand-checked cases: exact admissions, chunks, hits,
preemptions and step shapes (vLLM 0.11.0's V1 rules, see `kvqueue.gpu.scheduler`)."""

from __future__ import annotations

import pytest

from kvqueue.errors import ConfigError, RequestRejected
from kvqueue.gpu.batched_gpu import BatchedGpu
from kvqueue.gpu.events import BlocksStored
from kvqueue.gpu.presets import GPUS, get_preset
from kvqueue.gpu.scheduler import (
    BatchScheduler,
    ScheduledStep,
    SchedulerConfig,
    default_scheduler_config,
)
from kvqueue.gpu.step_cost import StepShape


def gpu_with(num_blocks: int, tokens: int = 2048, seqs: int = 256) -> BatchedGpu:
    return BatchedGpu(get_preset(num_blocks=num_blocks), config=SchedulerConfig(tokens, seqs))


def chunks(step: ScheduledStep) -> list[tuple[str, int, bool]]:
    """(request id, tokens, is decode) of every chunk, in step order."""
    return [(c.request.request.request_id, c.num_tokens, c.is_decode) for c in step.chunks]


def ids(requests) -> list[str]:
    return [r.request.request_id for r in requests]


def test_one_request_prefills_in_one_step_then_decodes_one_token_a_step(make_request):
    gpu = gpu_with(10)
    request = gpu.submit(make_request(40, request_id="a", max_tokens=3))
    scheduler = gpu.scheduler

    step = scheduler.schedule()
    assert chunks(step) == [("a", 40, False)]
    assert step.shape == StepShape(prefill_tokens=40, prefill_attention=40 * 40)
    # 2 full prompt blocks become cached at once; the partial third is an anonymous slot.
    stored = [e for e in gpu.take_events() if isinstance(e, BlocksStored)]
    assert [len(e.block_hashes) for e in stored] == [2]
    assert (len(request.table.block_hashes), request.table.num_anonymous_blocks) == (2, 1)
    outcome = scheduler.complete(step)
    assert (ids(outcome.sampled), ids(outcome.first_tokens)) == (["a"], ["a"])

    # The first token came out of the prefill step: two decode steps remain, at context
    # 40 then 41; position 40 still fits the third block, so nothing is allocated.
    step = scheduler.schedule()
    assert step.shape == StepShape(decode_batch=1, decode_context=40)
    scheduler.complete(step)
    step = scheduler.schedule()
    assert step.shape == StepShape(decode_batch=1, decode_context=41)
    outcome = scheduler.complete(step)
    assert ids(outcome.finished) == ["a"]
    assert (request.num_output, request.num_computed) == (3, 42)  # KV of prompt + 2 outputs
    # Released: its 2 hashed blocks stay cached and evictable, the anonymous one is free.
    assert (gpu.cache.num_evictable_blocks, gpu.cache.num_active_blocks) == (2, 0)
    assert not scheduler.has_work


def test_chunked_prefill_fills_the_token_budget_and_decodes_go_first(make_request):
    gpu = gpu_with(20, tokens=32, seqs=8)
    scheduler = gpu.scheduler
    gpu.submit(make_request(48, request_id="a", max_tokens=2))
    gpu.submit(make_request(20, request_id="b", max_tokens=1))

    step = scheduler.schedule()  # a takes the whole budget: 32 of its 48 tokens
    assert chunks(step) == [("a", 32, False)]
    assert ids(step.admitted) == ["a"]
    assert scheduler.complete(step).sampled == ()  # a prompt chunk short of the end samples nothing

    step = scheduler.schedule()  # a's last 16, then b admitted with the 16 tokens left
    assert chunks(step) == [("a", 16, False), ("b", 16, False)]
    assert step.shape == StepShape(32, 16 * (16 + 2 * 32) + 16 * 16, 0, 0)
    assert ids(scheduler.complete(step).first_tokens) == ["a"]

    step = scheduler.schedule()  # a decodes first (context 48), b finishes its prompt
    assert chunks(step) == [("a", 1, True), ("b", 4, False)]
    assert step.shape == StepShape(4, 4 * (4 + 2 * 16), 1, 48)
    outcome = scheduler.complete(step)
    assert ids(outcome.first_tokens) == ["b"]
    assert ids(outcome.finished) == ["a", "b"]  # a has its 2 tokens, b its 1


def test_a_fully_cached_prompt_recomputes_its_last_block(make_tokens, make_request):
    gpu = gpu_with(8)
    scheduler = gpu.scheduler
    tokens = make_tokens("s0", "s1")  # exactly 2 blocks
    gpu.submit(make_request(tokens, request_id="first", max_tokens=1))
    scheduler.complete(scheduler.schedule())
    repeat = gpu.submit(make_request(tokens, request_id="repeat", max_tokens=1))
    step = scheduler.schedule()
    # Hits are capped at (32 − 1) // 16 = 1 block: the last 16 tokens are computed again.
    assert repeat.num_hit_blocks == 1
    assert chunks(step) == [("repeat", 16, False)]
    assert step.shape == StepShape(16, 16 * (16 + 2 * 16), 0, 0)
    # The recomputed block is still cached: it is shared, not stored twice.
    assert gpu.cache.num_cached_blocks == 2
    assert (gpu.cache.stats.num_queried_blocks, gpu.cache.stats.num_hit_blocks) == (4, 1)


def test_a_shared_prefix_is_hit_at_admission_and_pinned(make_tokens, make_request):
    gpu = gpu_with(16)
    scheduler = gpu.scheduler
    gpu.submit(make_request(make_tokens("sys", "sys2", "q1"), request_id="a", max_tokens=4))
    scheduler.complete(scheduler.schedule())  # a runs, its 3 blocks cached and pinned
    b = gpu.submit(make_request(make_tokens("sys", "sys2", "q2"), request_id="b", max_tokens=2))
    step = scheduler.schedule()
    assert chunks(step) == [("a", 1, True), ("b", 16, False)]
    assert b.num_hit_blocks == 2
    shared = b.table.block_hashes[:2]
    assert [gpu.cache.ref_count(h) for h in shared] == [2, 2]


def test_a_decode_that_finds_no_block_preempts_the_latest_admitted(make_request):
    # 4 blocks. a and b: one 16-token prompt block each, 40 output tokens (peak 55 tokens:
    # 4 blocks, so each alone fits).
    gpu = gpu_with(4)
    scheduler = gpu.scheduler
    a = gpu.submit(make_request(16, request_id="a", max_tokens=40))
    b = gpu.submit(make_request(16, request_id="b", max_tokens=40))
    step = scheduler.schedule()
    assert chunks(step) == [("a", 16, False), ("b", 16, False)]
    scheduler.complete(step)
    # Each decode step writes one token; a second block each at position 16: 4 used.
    for _ in range(16):
        step = scheduler.schedule()
        assert step.preempted == ()
        scheduler.complete(step)
    assert (a.num_computed, b.num_computed, gpu.cache.num_allocatable) == (32, 32, 0)
    # Position 32 needs a third block each: a (first in the batch) preempts b.
    step = scheduler.schedule()
    assert ids(step.preempted) == ["b"]
    assert chunks(step) == [("a", 1, True)]
    assert step.admitted == ()  # no admission in a step that preempted
    assert (b.num_computed, b.num_output, b.num_preemptions) == (0, 17, 1)
    assert ids(scheduler.waiting) == ["b"]
    # b's prompt block stays cached (evictable); its two other slots are free again.
    (b_block,) = b.request.block_hashes
    assert b_block in gpu.cache.cached_hashes() and gpu.cache.ref_count(b_block) == 0
    assert b.table.num_slots == 0
    assert gpu.cache.num_evictable_blocks == 1
    scheduler.complete(step)
    # b would recompute 16 + 17 tokens behind its cached block: 2 new slots + 1 evictable
    # hit = 3 > 1 allocatable. Admission stops at it until a finishes.
    step = scheduler.schedule()
    assert chunks(step) == [("a", 1, True)]
    assert scheduler.signals().num_waiting == 1


def test_preempted_request_resumes_from_its_own_cached_prefix(make_request):
    gpu = gpu_with(4)
    scheduler = gpu.scheduler
    gpu.submit(make_request(16, request_id="a", max_tokens=20))
    b = gpu.submit(make_request(16, request_id="b", max_tokens=40))
    steps = []
    while scheduler.has_work:
        step = scheduler.schedule()
        steps.append(step)
        scheduler.complete(step)
    preempting = [i for i, s in enumerate(steps) if s.preempted]
    assert [ids(steps[i].preempted) for i in preempting] == [["b"]]
    resumed = next(s for s in steps[preempting[0] :] if s.admitted)
    # b was preempted holding 17 outputs. Once a has finished, b comes back: its cached
    # prompt block is a hit, and it recomputes its 17 generated tokens in one chunk.
    assert ids(resumed.admitted) == ["b"]
    assert chunks(resumed) == [("b", 17, False)]
    assert b.num_output == 40 and b.num_preemptions == 1
    assert b.num_hit_blocks == 0  # hits are those of its first admission


def test_admission_stops_at_the_first_waiting_request_that_does_not_fit(make_request):
    gpu = gpu_with(6)
    scheduler = gpu.scheduler
    gpu.submit(make_request(64, request_id="big-running", max_tokens=2))  # 4 + 1 blocks
    scheduler.complete(scheduler.schedule())
    gpu.submit(make_request(48, request_id="too-big-now", max_tokens=1))  # 3 blocks
    gpu.submit(make_request(8, request_id="small", max_tokens=1))  # 1 block: would fit
    step = scheduler.schedule()
    assert chunks(step) == [("big-running", 1, True)]
    assert ids(scheduler.waiting) == ["too-big-now", "small"]


def test_max_num_seqs_caps_the_running_batch(make_request):
    gpu = gpu_with(50, tokens=64, seqs=2)
    scheduler = gpu.scheduler
    for name in "abc":
        gpu.submit(make_request(8, request_id=name, max_tokens=5))
    step = scheduler.schedule()
    assert ids(step.admitted) == ["a", "b"]
    assert scheduler.signals().num_running == 2
    assert scheduler.signals().num_waiting == 1


def test_load_signals_count_evictable_blocks_as_free(make_request):
    gpu = gpu_with(10)
    scheduler = gpu.scheduler
    gpu.submit(make_request(64, request_id="a", max_tokens=1))
    gpu.submit(make_request(33, request_id="b", max_tokens=3))
    assert scheduler.signals().num_queued_prefill_tokens == 97
    scheduler.complete(scheduler.schedule())  # a finishes at once; b's KV stays pinned
    signals = scheduler.signals()
    assert (signals.num_running, signals.num_waiting) == (1, 0)
    # b holds 3 slots; a's 4 released blocks are cached but count as free.
    assert gpu.cache.num_used_slots == 7
    assert signals.kv_usage == pytest.approx(3 / 10)
    assert signals.num_queued_prefill_tokens == 0


def test_requests_that_can_never_fit_are_rejected_at_submission(make_request):
    gpu = gpu_with(4)
    with pytest.raises(
        RequestRejected, match="needs 5 KV blocks at its longest; the cache holds 4"
    ):
        gpu.submit(make_request(48, max_tokens=20))  # 48 + 19 = 67 tokens = 5 blocks
    with pytest.raises(RequestRejected, match="exceeds the 4,096-token context"):
        gpu.submit(make_request(4000, max_tokens=100))
    assert not gpu.scheduler.has_work


def test_a_request_with_no_output_finishes_when_its_prompt_is_computed(make_request):
    gpu = gpu_with(4)
    gpu.submit(make_request(20, request_id="z", max_tokens=0))
    outcome = gpu.scheduler.complete(gpu.scheduler.schedule())
    assert (ids(outcome.first_tokens), ids(outcome.finished), outcome.sampled) == (["z"], ["z"], ())


def test_vllm_serving_defaults_depend_on_the_gpu():
    assert default_scheduler_config(GPUS["a100-80gb"]) == SchedulerConfig(2048, 256)
    assert default_scheduler_config(GPUS["l40s-48gb"]) == SchedulerConfig(2048, 256)
    assert default_scheduler_config(GPUS["h100-80gb"]) == SchedulerConfig(8192, 1024)
    assert default_scheduler_config(GPUS["h200-141gb"]) == SchedulerConfig(8192, 1024)
    assert default_scheduler_config(GPUS["h100-80gb"], 512) == SchedulerConfig(512, 512)
    with pytest.raises(ConfigError, match="max_num_seqs \\(600\\) exceeds"):
        default_scheduler_config(GPUS["h100-80gb"], 512, 600)
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        SchedulerConfig(0, 1)


def test_scheduler_rejects_a_second_run_or_a_step_during_a_run(make_request):
    gpu = gpu_with(20)
    scheduler: BatchScheduler = gpu.scheduler
    gpu.submit(make_request(16, max_tokens=10))
    scheduler.complete(scheduler.schedule())
    run = scheduler.plan_decode_run()
    assert run is not None and run.num_steps == 9
    with pytest.raises(AssertionError, match="decode run is in progress"):
        scheduler.schedule()


def test_a_request_preempted_after_its_prompt_resumes_as_a_decode_of_its_last_token(
    make_tokens, make_request
):
    # 16 blocks, budget 22: a (96 tokens) and b (48) decode while c (80 tokens, 2 outputs)
    # finishes its prompt; at the next block boundary c, the latest admitted, is preempted.
    gpu = gpu_with(16, tokens=22, seqs=3)
    scheduler = gpu.scheduler
    gpu.submit(make_request(make_tokens("b", *"aaaaa"), request_id="a", max_tokens=8))
    gpu.submit(make_request(make_tokens("c", "a", "a"), request_id="b", max_tokens=6))
    c = gpu.submit(make_request(make_tokens(*"aaaaa"), request_id="c", max_tokens=2))
    steps = []
    while not any(s.preempted for s in steps):
        steps.append(scheduler.schedule())
        scheduler.complete(steps[-1])
    assert ids(steps[-1].preempted) == ["c"] and c.num_output == 1
    assert scheduler.num_queued_prefill_tokens == 81  # all of c: its prompt and its token
    # Back in, c hits its 5 cached prompt blocks and only lacks its output token's KV:
    # one token at context 80, priced as a decode.
    step = scheduler.schedule()
    assert chunks(step) == [("c", 1, True)]
    assert step.shape == StepShape(decode_batch=1, decode_context=80)
    assert scheduler.num_queued_prefill_tokens == 0
    assert ids(scheduler.complete(step).finished) == ["c"]


def test_an_aborted_request_leaves_the_batch_its_blocks_released_and_cached(make_request):
    gpu = gpu_with(20, tokens=64, seqs=1)
    scheduler = gpu.scheduler
    running = gpu.submit(make_request(48, request_id="a", max_tokens=5))
    waiting = gpu.submit(make_request(64, request_id="b", max_tokens=5))
    scheduler.complete(scheduler.schedule())  # a's prompt; b waits for a sequence slot
    assert (ids(scheduler.running), ids(scheduler.waiting)) == (["a"], ["b"])
    assert scheduler.num_queued_prefill_tokens == 64

    scheduler.abort(waiting)
    assert (ids(scheduler.waiting), scheduler.num_queued_prefill_tokens) == ([], 0)
    scheduler.abort(running)
    scheduler.abort(running)  # a second abort changes nothing
    assert (scheduler.running, running.finished, scheduler.has_work) == ([], True, False)
    # a's 3 prompt blocks stay cached, evictable; its partial block is free again.
    assert (gpu.cache.num_active_blocks, gpu.cache.num_evictable_blocks) == (0, 3)
    again = gpu.submit(make_request(running.request.token_ids, request_id="a2", max_tokens=1))
    scheduler.schedule()
    assert again.num_hit_blocks == 2  # the last token is always computed: 47 // 16 = 2
