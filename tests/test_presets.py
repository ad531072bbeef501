"""Presets: the model and GPU figures, and the arithmetic that gives the block count."""

from __future__ import annotations

import pytest

from kvqueue.cli import main as kvqueue_main
from kvqueue.errors import ConfigError
from kvqueue.gpu.presets import (
    DEFAULT_PRESET,
    GIB,
    GPUS,
    MODELS,
    GpuSpec,
    ModelSpec,
    Preset,
    all_presets,
    get_preset,
)


def test_llama_2_13b_has_40_layers_40_kv_heads_head_dim_128_in_fp16_and_4096_context():
    model = MODELS["llama-2-13b"]
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (40, 40, 128)
    assert model.dtype_bytes == 2
    assert model.max_context_tokens == 4_096


def test_default_preset_is_llama_2_13b_on_a100_40gb():
    preset = get_preset()
    assert preset.name == DEFAULT_PRESET == "llama-2-13b@a100-40gb"
    assert preset.gpu.memory_bytes == 40 * GIB


def test_llama_2_13b_block_of_16_tokens_takes_13_107_200_bytes():
    assert get_preset().block_size == 16
    assert get_preset().bytes_per_block == 2 * 40 * 40 * 128 * 2 * 16 == 13_107_200


def test_default_preset_has_924_blocks():
    preset = get_preset()
    assert preset.derived_num_blocks == 924
    assert preset.num_blocks == 924
    assert preset.kv_tokens == 924 * 16


def test_block_count_is_the_kv_budget_divided_by_bytes_per_block_rounded_down():
    preset = get_preset()
    assert preset.kv_budget_bytes // preset.bytes_per_block == 924
    assert 924 * 13_107_200 <= preset.kv_budget_bytes < 925 * 13_107_200


def test_printed_arithmetic_shows_13_107_200_bytes_and_924_blocks():
    text = get_preset().arithmetic()
    assert "2 × 40 layers × 40 KV heads × 128 dim × 2 B × 16 tokens" in text
    assert "= 13,107,200 B" in text
    assert text.rstrip().endswith("= 924")


def test_kvqueue_presets_command_prints_the_default_arithmetic(capsys):
    assert kvqueue_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "13,107,200" in out
    assert "= 924" in out
    assert "llama-2-13b@a100-40gb" in out


def test_block_count_override_replaces_the_derived_count_and_is_shown():
    preset = get_preset(num_blocks=100)
    assert preset.num_blocks == 100
    assert preset.derived_num_blocks == 924
    assert "100 (override)" in preset.arithmetic()


def test_context_override_replaces_the_models_context():
    assert get_preset(max_context_tokens=32_768).max_context_tokens == 32_768


def test_gqa_model_block_uses_its_8_kv_heads():
    preset = get_preset("llama-3.1-8b@h100-80gb")
    assert (preset.model.num_layers, preset.model.num_kv_heads) == (32, 8)
    assert preset.bytes_per_block == 2 * 32 * 8 * 128 * 2 * 16 == 2_097_152


def test_larger_gpus_hold_more_blocks_of_the_same_model():
    assert {"a100-80gb", "h100-80gb"} <= set(GPUS)
    small = get_preset("llama-2-13b@a100-40gb").num_blocks
    assert get_preset("llama-2-13b@a100-80gb").num_blocks > small
    assert get_preset("llama-2-13b@h100-80gb").num_blocks > small


def test_long_context_presets_fit_a_80k_token_prompt():
    preset = get_preset("llama-3.1-8b@h100-80gb")
    assert preset.max_context_tokens >= 80_000
    assert preset.kv_tokens >= 80_000


def test_bare_model_name_means_the_default_gpu():
    assert get_preset("llama-3.1-8b").name == "llama-3.1-8b@a100-40gb"


def test_every_listed_preset_has_room_for_kv_cache():
    presets = all_presets()
    assert DEFAULT_PRESET in {p.name for p in presets}
    assert all(p.num_blocks > 0 for p in presets)


def test_weights_that_fill_the_gpu_leave_zero_blocks():
    huge = ModelSpec("huge", 80, 8, 128, 2, 70_000_000_000, 8_192)
    assert Preset(huge, GpuSpec("tiny", 40 * GIB)).derived_num_blocks == 0


@pytest.mark.parametrize(
    ("name", "offending"),
    [("gpt-5@a100-40gb", "gpt-5"), ("llama-2-13b@tpu-v9", "tpu-v9"), ("nope", "nope")],
)
def test_unknown_model_or_gpu_is_rejected_naming_it(name, offending):
    with pytest.raises(ConfigError, match=offending):
        get_preset(name)


@pytest.mark.parametrize("num_blocks", [0, -5])
def test_non_positive_block_count_override_is_rejected_naming_it(num_blocks):
    with pytest.raises(ConfigError, match=rf"num_blocks must be positive, got {num_blocks}"):
        get_preset(num_blocks=num_blocks)


@pytest.mark.parametrize("max_context", [0, -1])
def test_non_positive_context_override_is_rejected_naming_it(max_context):
    with pytest.raises(ConfigError, match=rf"got {max_context}"):
        get_preset(max_context_tokens=max_context)
