"""One simulated GPU: admission with clear rejections, allocation, latency, release."""

from __future__ import annotations

import pytest

from kvqueue.errors import RequestRejected
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import get_preset
from kvqueue.gpu.request import Request
from kvqueue.gpu.simulated_gpu import SimulatedGpu


class FixedOracle:
    """Every request generates `tokens` tokens (unless it says otherwise)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def decode_length(self, request: Request) -> tuple[int, str]:
        if request.max_tokens is not None:
            return request.max_tokens, "request"
        return self.tokens, "fixed"


def test_default_gpu_is_the_default_preset_with_924_blocks():
    gpu = SimulatedGpu()
    assert gpu.preset.name == "llama-2-13b@a100-40gb"
    assert gpu.cache.num_blocks == 924


def test_cold_prompt_prefills_every_block_and_a_repeat_hits_them_all(make_request):
    gpu = SimulatedGpu()
    tokens = list(range(160))  # 10 full blocks
    first = gpu.start(make_request(tokens, max_tokens=20))
    assert first.allocation.num_blocks_to_compute == 10
    assert first.prefill_ms == 5.0 + 2.5 * 10
    assert (first.decode_tokens, first.decode_source, first.decode_ms) == (20, "request", 300.0)
    assert first.service_ms == 330.0
    gpu.finish(first)

    repeat = gpu.start(make_request(tokens, max_tokens=20))
    assert repeat.allocation.num_hit_blocks == 10
    assert repeat.prefill_ms == 5.0


def test_shared_prefix_prefills_only_the_blocks_after_the_first_miss(make_request):
    gpu = SimulatedGpu()
    system = list(range(96))  # 6 blocks
    gpu.finish(gpu.start(make_request([*system, *range(1000, 1032)], max_tokens=1)))
    execution = gpu.start(make_request([*system, *range(2000, 2048)], max_tokens=1))
    assert execution.allocation.num_hit_blocks == 6
    assert execution.allocation.num_blocks_to_compute == 3
    assert execution.prefill_ms == 5.0 + 2.5 * 3


def test_gpu_uses_an_overridden_latency_model(make_request):
    gpu = SimulatedGpu(latency=LatencyModel(10.0, 1.0, 2.0))
    execution = gpu.start(make_request(64, max_tokens=5))
    assert (execution.prefill_ms, execution.decode_ms) == (14.0, 10.0)


def test_prompt_over_the_context_is_rejected_with_the_numbers(make_request):
    gpu = SimulatedGpu()
    with pytest.raises(RequestRejected) as info:
        gpu.start(make_request(5_000, max_tokens=10))
    assert "5,000" in info.value.reason
    assert "4,096" in info.value.reason
    assert "llama-2-13b@a100-40gb" in info.value.reason
    assert gpu.cache.num_used_slots == 0
    assert gpu.take_events() == []


def test_prompt_plus_requested_output_over_the_context_is_rejected(make_request):
    gpu = SimulatedGpu()
    with pytest.raises(RequestRejected, match="4,000 tokens \\+ 200 output tokens"):
        gpu.start(make_request(4_000, max_tokens=200))


def test_output_without_a_cap_is_cut_to_the_room_left_in_the_context(make_request):
    gpu = SimulatedGpu(oracle=FixedOracle(500))
    execution = gpu.start(make_request(4_000))
    assert execution.decode_tokens == 96
    assert execution.decode_source == "fixed"


def test_request_needing_more_blocks_than_the_cache_holds_is_rejected(make_request):
    preset = get_preset("llama-3.1-8b@a100-40gb", num_blocks=8)
    gpu = SimulatedGpu(preset, oracle=FixedOracle(0))
    with pytest.raises(RequestRejected) as info:
        gpu.start(make_request(16 * 9))
    assert info.value.reason == "request needs 9 KV blocks; the cache holds 8"
    assert gpu.cache.num_used_slots == 0
    assert gpu.take_events() == []


def test_output_tokens_count_towards_the_blocks_a_request_needs(make_request):
    preset = get_preset("llama-3.1-8b@a100-40gb", num_blocks=8)
    gpu = SimulatedGpu(preset)
    with pytest.raises(RequestRejected, match="needs 9 KV blocks"):
        gpu.start(make_request(16 * 7, max_tokens=17))  # 7 prompt + 2 output blocks


def test_partial_prompt_block_and_output_take_anonymous_slots_until_finish(make_request):
    gpu = SimulatedGpu(get_preset(num_blocks=10))
    execution = gpu.start(make_request(40, max_tokens=10))  # 50 tokens: 4 slots, 2 hashed
    assert execution.request.num_blocks == 2
    assert execution.allocation.num_anonymous_blocks == 2
    assert gpu.cache.num_used_slots == 4
    gpu.finish(execution)
    assert gpu.cache.num_used_slots == 2
    assert gpu.cache.num_evictable_blocks == 2


def test_events_of_a_served_request_are_drained_from_the_gpu(make_request):
    gpu = SimulatedGpu()
    request = make_request(48, max_tokens=1)
    gpu.finish(gpu.start(request))
    events = gpu.take_events()
    assert len(events) == 1 and events[0].block_hashes == request.block_hashes
    assert gpu.take_events() == []


def test_empty_prompt_is_rejected_naming_the_request(make_request):
    with pytest.raises(ValueError, match=r"'empty-1' has an empty prompt \(0 tokens\)"):
        make_request([], request_id="empty-1")
