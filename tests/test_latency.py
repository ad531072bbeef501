"""The latency model: prefill 5 + 2.5 × blocks, decode 15 × tokens, TTFT and end-to-end."""

from __future__ import annotations

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.latency import LatencyModel, end_to_end_ms, ttft_ms


@pytest.mark.parametrize(("blocks", "expected_ms"), [(0, 5.0), (1, 7.5), (10, 30.0), (924, 2315.0)])
def test_prefill_is_5_ms_plus_2_5_ms_per_block_to_compute(blocks, expected_ms):
    assert LatencyModel().prefill_ms(blocks) == expected_ms


@pytest.mark.parametrize(("tokens", "expected_ms"), [(0, 0.0), (1, 15.0), (256, 3840.0)])
def test_decode_is_15_ms_per_token(tokens, expected_ms):
    assert LatencyModel().decode_ms(tokens) == expected_ms


def test_ttft_is_queue_wait_plus_prefill_and_end_to_end_adds_decode():
    model = LatencyModel()
    prefill = model.prefill_ms(4)  # 15 ms
    decode = model.decode_ms(10)  # 150 ms
    ttft = ttft_ms(queue_wait_ms=100.0, prefill_ms=prefill)
    assert ttft == 115.0
    assert end_to_end_ms(ttft, decode) == 265.0
    assert model.service_ms(4, 10) == 165.0


def test_latency_constants_are_overridable():
    model = LatencyModel(prefill_base_ms=1.0, prefill_per_block_ms=0.5, decode_per_token_ms=20.0)
    assert model.prefill_ms(10) == 6.0
    assert model.decode_ms(3) == 60.0


@pytest.mark.parametrize(
    "field", ["prefill_base_ms", "prefill_per_block_ms", "decode_per_token_ms"]
)
@pytest.mark.parametrize("value", [-1.0, -0.5, float("nan")])
def test_negative_or_nan_latency_constant_is_rejected_naming_it(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be >= 0, got {value}"):
        LatencyModel(**{field: value})


def test_negative_block_or_token_counts_are_rejected_naming_them():
    with pytest.raises(ValueError, match="got -1"):
        LatencyModel().prefill_ms(-1)
    with pytest.raises(ValueError, match="got -7"):
        LatencyModel().decode_ms(-7)
