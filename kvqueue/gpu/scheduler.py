"""Iteration-level scheduling for one simulated GPU: what runs in each step, nothing else.

The rules are vLLM's V1 scheduler with FCFS policy, chunked prefill and prefix caching, as of
vLLM 0.11.0 (commit f71952c1c): `vllm/v1/core/sched/scheduler.py` (`Scheduler.schedule`,
`_update_after_schedule`, `update_from_output`, `_free_request`),
`vllm/v1/core/kv_cache_manager.py` (`get_computed_blocks`, `allocate_slots`) and
`vllm/v1/core/block_pool.py`. One `schedule()` call is one forward pass:

1. **Running requests first**, in admission order, while the step's token budget
   (`max_num_batched_tokens`) lasts: each gets what it still lacks — one token when decoding,
   the rest of its prompt (capped by the budget: chunked prefill) otherwise. Its new tokens
   get KV slots; a slot is needed only when a block boundary is crossed. When no slot is
   allocatable (free or evictable), the **last** running request (the most recently
   admitted) is preempted: its blocks are released — hashed ones stay cached — its computed
   tokens reset to 0, and it goes back to the **front** of the waiting queue, keeping its
   output; repeated until the allocation fits. If the request preempts itself, the running
   pass ends.
2. **Then waiting requests**, FIFO, only if nobody was preempted this step, while the budget
   lasts and fewer than `max_num_seqs` run: a request's prefix hit is the leading run of its
   cached prompt blocks, capped at ``(num_tokens − 1) // block_size`` blocks (the last token
   is always computed, for its logits); it is admitted for ``min(num_tokens − hit, budget)``
   tokens if that many new slots plus its evictable hit blocks are allocatable; **the first
   request that does not fit stops admission** (no skipping ahead, no preemption).
3. **After the step** (`complete`): a request whose computed tokens reach its length samples
   one output token (the first one ends its time to first token); a request with all its
   output tokens is finished and its blocks released at once.

Blocks of a prompt become cached (and are announced) when the step that fills them is
scheduled, so a request admitted later in the same step can hit them, as in vLLM. Generated
tokens are never hashed here (kvqueue has no output token ids), so they occupy anonymous
slots; the KV a finished request held is its prompt plus all its outputs but the last.

Kept apart, as the engine's three concerns: *what* runs (this module, no clock, no I/O),
*how long* it takes (`kvqueue.gpu.step_cost`), and *when* (the driver: the simulator's virtual
clock, or a live worker's wall clock).

**Decode runs** (`plan_decode_run`): when every running request is decoding and admission is
blocked, each following step is the same batch plus one token each, until a request finishes
or an allocation would need a preemption. A `DecodeRun` describes those steps so a driver can
jump over them: `advance_run` performs the KV allocations of the steps started so far (in
the order single steps would: step by step, running order within a step), and
`complete_run` applies the run's tokens. Stepping one at a time gives the same state.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.cache import BlockCache, BlockTable
from kvqueue.gpu.hashing import BLOCK_SIZE
from kvqueue.gpu.load_signals import LoadSignals
from kvqueue.gpu.presets import GIB, GpuSpec
from kvqueue.gpu.request import Request
from kvqueue.gpu.step_cost import StepShape, chunk_attention

# vLLM 0.11.0 `EngineArgs._set_default_args` (vllm/engine/arg_utils.py) for `vllm serve`
# (UsageContext.OPENAI_API_SERVER): 2,048 batched tokens and 256 sequences; 8,192 and 1,024
# on a GPU of at least 70 GiB whose name does not contain "a100" (H100, H200).
SERVE_MAX_NUM_BATCHED_TOKENS = 2_048
SERVE_MAX_NUM_SEQS = 256
LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 8_192
LARGE_GPU_MAX_NUM_SEQS = 1_024
LARGE_GPU_MIN_BYTES = 70 * GIB


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one step. Defaults: vLLM's online-serving defaults for a small GPU."""

    max_num_batched_tokens: int = SERVE_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = SERVE_MAX_NUM_SEQS

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ConfigError(
                f"max_num_seqs ({self.max_num_seqs:,}) exceeds max_num_batched_tokens "
                f"({self.max_num_batched_tokens:,}): every running request needs a token a step"
            )


def default_scheduler_config(
    gpu: GpuSpec,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
) -> SchedulerConfig:
    """vLLM 0.11.0's `vllm serve` defaults for `gpu` (see the constants), with overrides.

    An overridden token budget below the default sequence cap lowers the cap to it, as vLLM
    does; an explicit cap above an explicit budget is an error.
    """
    large = gpu.memory_bytes >= LARGE_GPU_MIN_BYTES and "a100" not in gpu.name
    tokens = max_num_batched_tokens or (
        LARGE_GPU_MAX_NUM_BATCHED_TOKENS if large else SERVE_MAX_NUM_BATCHED_TOKENS
    )
    seqs = max_num_seqs or min(tokens, LARGE_GPU_MAX_NUM_SEQS if large else SERVE_MAX_NUM_SEQS)
    return SchedulerConfig(tokens, seqs)


@dataclass(slots=True, eq=False)
class EngineRequest:
    """A request inside the batched engine.

    `num_computed` is vLLM's ``num_computed_tokens``: tokens whose KV is computed or scheduled
    (hits included). ``num_tokens`` = prompt + outputs so far. A request is *decoding* when
    it has an output and lacks exactly one token's KV (the last sampled token's). `tag` is the
    driver's own record of the request (times, routing decision); the scheduler ignores it.
    """

    request: Request
    num_output_target: int
    decode_source: str = ""
    tag: Any = None
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    num_output: int = 0
    num_hit_blocks: int | None = None  # prefix hits at its first admission
    num_preemptions: int = 0
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return self.request.num_prompt_tokens + self.num_output

    @property
    def is_decoding(self) -> bool:
        return self.num_output > 0 and self.num_computed == self.num_tokens - 1

    @property
    def peak_tokens(self) -> int:
        """Tokens of KV it holds at most: prompt plus every output but the last."""
        return self.request.num_prompt_tokens + max(0, self.num_output_target - 1)


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One request's share of a step: `num_tokens` computed after `num_computed_before`."""

    request: EngineRequest
    num_tokens: int
    num_computed_before: int
    is_decode: bool


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """What one forward pass does; `shape` is what its cost depends on."""

    chunks: tuple[ScheduledChunk, ...]
    admitted: tuple[EngineRequest, ...]
    preempted: tuple[EngineRequest, ...]
    shape: StepShape


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """After a step: who sampled a token, for whom it was the first, who finished.

    A request with no output to produce finishes when its prompt is computed: it is in
    `first_tokens` and `finished` but not in `sampled`.
    """

    sampled: tuple[EngineRequest, ...] = ()
    first_tokens: tuple[EngineRequest, ...] = ()
    finished: tuple[EngineRequest, ...] = ()


@dataclass(slots=True, eq=False)
class DecodeRun:
    """`num_steps` decode-only steps of a fixed batch (`requests`, in running order).

    Step s (0-based) gives every request one token; its summed context is
    ``decode_context + s × len(requests)``. `allocations` lists, in the order single steps
    would make them, the (step, position in `requests`) of every KV slot the run needs;
    `num_allocated` of them are done. A driver may cut the run short (`cut_run`).
    """

    requests: tuple[EngineRequest, ...]
    num_steps: int
    decode_context: int
    allocations: list[tuple[int, int]]
    num_allocated: int = 0

    @property
    def batch(self) -> int:
        return len(self.requests)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BatchScheduler:
    """Waiting queue and running batch over one block cache (rules in the module docstring).

    Invariants: a request is in exactly one of `waiting`, `running`, or finished; a running
    request's blocks stay pinned (never evicted) until it finishes or is preempted; a waiting
    request holds no blocks; `running` never exceeds `max_num_seqs`; a step computes at most
    `max_num_batched_tokens` tokens; `num_queued_prefill_tokens` equals the sum it names.
    """

    def __init__(
        self, cache: BlockCache, config: SchedulerConfig | None = None, block_size: int = BLOCK_SIZE
    ) -> None:
        self.cache = cache
        self.config = config or SchedulerConfig()
        self.block_size = block_size
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.num_preemptions = 0
        self._queued_prefill_tokens = 0
        self._run: DecodeRun | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return self._queued_prefill_tokens

    def signals(self) -> LoadSignals:
        cache = self.cache
        return LoadSignals(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=cache.kv_usage,
            num_queued_prefill_tokens=self._queued_prefill_tokens,
        )

    # -- one step --------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        """A request joins the tail of the waiting queue (the caller checked it can fit)."""
        self.waiting.append(request)
        self._queued_prefill_tokens += _queued_prefill(request)

    def schedule(self) -> ScheduledStep:
        """Decide the next step (module docstring) and allocate its KV slots."""
        assert self._run is None, "a decode run is in progress"
        cache = self.cache
        budget = self.config.max_num_batched_tokens
        running = self.running
        chunks: list[ScheduledChunk] = []
        preempted: list[EngineRequest] = []
        admitted: list[EngineRequest] = []

        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_tokens = min(request.num_tokens - request.num_computed, budget)
            needed = self._new_slots(request, num_tokens)
            while needed > cache.num_allocatable:
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if preempted and preempted[-1] is request:
                break
            chunks.append(self._schedule_chunk(request, num_tokens))
            budget -= num_tokens
            i += 1

        if not preempted:
            max_seqs = self.config.max_num_seqs
            while self.waiting and budget > 0 and len(running) < max_seqs:
                request = self.waiting[0]
                num_hits, num_tokens, needed = self._admission(request, budget)
                if needed > cache.num_allocatable:
                    break
                self.waiting.popleft()
                hashes = request.request.block_hashes
                cache.pin_prefix(request.table, hashes, num_hits)
                if request.num_hit_blocks is None:
                    request.num_hit_blocks = num_hits
                queued = _queued_prefill(request)
                request.num_computed = num_hits * self.block_size
                self._queued_prefill_tokens += _queued_prefill(request) - queued
                chunks.append(self._schedule_chunk(request, num_tokens))
                running.append(request)
                admitted.append(request)
                budget -= num_tokens

        return ScheduledStep(tuple(chunks), tuple(admitted), tuple(preempted), _shape(chunks))

    def complete(self, step: ScheduledStep) -> StepOutcome:
        """The step ran: sample a token for every request whose KV is complete, finish those
        that have all their output, release their blocks (in running order)."""
        sampled: list[EngineRequest] = []
        first: list[EngineRequest] = []
        finished: list[EngineRequest] = []
        for chunk in step.chunks:
            request = chunk.request
            if request.num_computed < request.num_tokens:
                continue  # a prompt chunk short of the end samples nothing
            if request.num_output_target == 0:
                first.append(request)
                finished.append(request)
                continue
            request.num_output += 1
            sampled.append(request)
            if request.num_output == 1:
                first.append(request)
            if request.num_output >= request.num_output_target:
                finished.append(request)
        self._finish(finished)
        return StepOutcome(tuple(sampled), tuple(first), tuple(finished))

    def abort(self, request: EngineRequest) -> None:
        """The request leaves the engine unfinished (its client is gone): a running one's
        blocks are released — hashed ones stay cached — and a waiting one is dropped. vLLM's
        `Scheduler.finish_requests(..., FINISHED_ABORTED)`; call it between steps."""
        assert self._run is None, "a decode run is in progress"
        if request.finished:
            return
        self._queued_prefill_tokens -= _queued_prefill(request)
        if request in self.running:
            self._finish([request])
        else:
            self.waiting.remove(request)
            request.finished = True

    # -- decode runs -----------------------------------------------------------------------
    def plan_decode_run(self) -> DecodeRun | None:
        """The decode-only steps ahead, if at least two are certain (module docstring).

        Certain means: every running request is decoding; admission is blocked (nothing
        waits, the sequence cap or the token budget is reached, or the head of the queue
        lacks blocks — which stays so, as allocatable blocks only shrink until someone
        finishes); no request finishes before the last step; and the run's allocations fit
        in the allocatable blocks, so no preemption. Returns None otherwise.
        """
        assert self._run is None, "a decode run is in progress"
        running = self.running
        batch = len(running)
        if batch < 1:
            return None
        if not running[-1].is_decoding:  # the latest admitted is often still in prefill
            return None
        bs = self.block_size
        steps_to_finish = None
        context = 0
        offsets: list[int] = []
        for request in running:
            if not request.is_decoding:
                return None
            left = request.num_output_target - request.num_output
            steps_to_finish = left if steps_to_finish is None else min(steps_to_finish, left)
            context += request.num_computed
            offsets.append(-request.num_computed % bs)
        budget = self.config.max_num_batched_tokens - batch
        if steps_to_finish is None or steps_to_finish < 2 or not self._admission_blocked(budget):
            return None
        # Every bs steps each request takes one slot, at step offset (−computed) mod bs. With
        # q = avail // batch full rounds and r = avail % batch slots left, the first step that
        # cannot be served is bs·q + the (r+1)-th smallest offset.
        rounds, left_over = divmod(self.cache.num_allocatable, batch)
        steps_fitting = bs * rounds + sorted(offsets)[left_over]
        num_steps = min(steps_to_finish, steps_fitting)
        if num_steps < 2:
            return None
        allocations = sorted(
            (step, position)
            for position, offset in enumerate(offsets)
            for step in range(offset, num_steps, bs)
        )
        self._run = DecodeRun(tuple(running), num_steps, context, allocations)
        return self._run

    def advance_run(self, run: DecodeRun, num_steps_started: int) -> None:
        """Make the KV allocations of the run's first `num_steps_started` steps."""
        assert run is self._run, "not the current decode run"
        allocations = run.allocations
        done = run.num_allocated
        # Allocations are sorted by (step, position): those of steps before `end` come first.
        todo = bisect.bisect_left(allocations, (min(num_steps_started, run.num_steps), -1), done)
        if todo > done:
            requests = run.requests
            tables = [requests[position].table for _, position in allocations[done:todo]]
            self.cache.allocate_slot_each(tables)
            run.num_allocated = todo

    def cut_run(self, run: DecodeRun, num_steps: int) -> None:
        """Keep only the run's first `num_steps` steps (at least the ones already started)."""
        assert run is self._run, "not the current decode run"
        if not 1 <= num_steps <= run.num_steps:
            raise ValueError(f"cannot cut a {run.num_steps}-step run to {num_steps} steps")
        run.num_steps = num_steps

    def complete_run(self, run: DecodeRun) -> StepOutcome:
        """The run's steps ran: every request gained one token per step; the last step's
        finished requests are released, as `complete` would."""
        assert run is self._run, "not the current decode run"
        self.advance_run(run, run.num_steps)
        steps = run.num_steps
        finished = []
        for request in run.requests:
            request.num_computed += steps
            request.num_output += steps
            if request.num_output >= request.num_output_target:
                finished.append(request)
        self._run = None
        self._finish(finished)
        return StepOutcome(run.requests, (), tuple(finished))

    # -- internals -------------------------------------------------------------------------
    def _new_slots(self, request: EngineRequest, num_tokens: int) -> int:
        return (
            _ceil_div(request.num_computed + num_tokens, self.block_size) - request.table.num_slots
        )

    def _admission(self, request: EngineRequest, budget: int) -> tuple[int, int, int]:
        """(hit blocks, tokens to schedule, blocks needed) for admitting a waiting request."""
        bs = self.block_size
        hashes = request.request.block_hashes
        num_hits, evictable = self.cache.lookup_prefix(hashes, (request.num_tokens - 1) // bs)
        num_tokens = min(request.num_tokens - num_hits * bs, budget)
        new_slots = _ceil_div(num_hits * bs + num_tokens, bs) - num_hits
        return num_hits, num_tokens, new_slots + evictable

    def _admission_blocked(self, budget: int) -> bool:
        if not self.waiting or budget <= 0 or len(self.running) >= self.config.max_num_seqs:
            return True
        return self._admission(self.waiting[0], budget)[2] > self.cache.num_allocatable

    def _schedule_chunk(self, request: EngineRequest, num_tokens: int) -> ScheduledChunk:
        """Allocate the chunk's slots, cache the prompt blocks it fills, advance the request."""
        is_decode = request.is_decoding
        before = request.num_computed
        cache = self.cache
        table = request.table
        after = before + num_tokens
        new_slots = _ceil_div(after, self.block_size) - table.num_slots
        if new_slots > 0:
            cache.allocate_slots(table, new_slots)
        if is_decode:
            # Its prompt blocks are all committed and it queues no prefill, before or after.
            request.num_computed = after
            return ScheduledChunk(request, num_tokens, before, True)
        hashes = request.request.block_hashes
        num_full = min(len(hashes), after // self.block_size)
        if num_full > len(table.block_hashes):
            cache.commit_full(table, hashes[len(table.block_hashes) : num_full])
        queued = _queued_prefill(request)
        request.num_computed = after
        self._queued_prefill_tokens += _queued_prefill(request) - queued
        return ScheduledChunk(request, num_tokens, before, is_decode)

    def _preempt(self, request: EngineRequest) -> None:
        queued = _queued_prefill(request)
        self.cache.release(request.table)
        request.num_computed = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._queued_prefill_tokens += _queued_prefill(request) - queued
        self.waiting.appendleft(request)

    def _finish(self, finished: Sequence[EngineRequest]) -> None:
        if not finished:
            return
        for request in finished:
            request.finished = True
            self.cache.release(request.table)
        self.running = [r for r in self.running if not r.finished]


def _queued_prefill(request: EngineRequest) -> int:
    """A request's share of `num_queued_prefill_tokens`: tokens it still has to compute,
    unless it is decoding (its one missing token is a decode, not prefill)."""
    return 0 if request.is_decoding else request.num_tokens - request.num_computed


def _shape(chunks: Sequence[ScheduledChunk]) -> StepShape:
    prefill = attention = batch = context = 0
    for chunk in chunks:
        if chunk.is_decode:
            batch += 1
            context += chunk.num_computed_before
        else:
            prefill += chunk.num_tokens
            attention += chunk_attention(chunk.num_tokens, chunk.num_computed_before)
    return StepShape(prefill, attention, batch, context)
