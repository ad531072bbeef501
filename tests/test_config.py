"""Settings: environment variables map onto fields, CLI flags override them, bad values fail."""

from __future__ import annotations

import pytest

from kvqueue.config import ENV_TO_FIELD, Settings
from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel

ENV_EXAMPLES = {
    "REDIS_URL": ("redis://cache.internal:6380/2", "redis://cache.internal:6380/2"),
    "KVQ_PREFIX": ("test:", "test:"),
    "ROUTING_STRATEGY": ("round_robin", "round_robin"),
    "KVQ_TIME_SCALE": ("0.1", 0.1),
    "KVQ_PRESET": ("llama-3.1-8b@h100-80gb", "llama-3.1-8b@h100-80gb"),
    "KVQ_NUM_BLOCKS": ("128", 128),
    "KVQ_MAX_CONTEXT": ("8192", 8192),
    "KVQ_HASH_SEED": ("cluster-7", "cluster-7"),
    "KVQ_TOKENIZER": ("gpt2", "gpt2"),
    "KVQ_DECODE_MODEL": ("sshleifer/tiny-gpt2", "sshleifer/tiny-gpt2"),
    "KVQ_HEARTBEAT_TTL": ("5", 5.0),
    "KVQ_PENDING_TTL": ("12.5", 12.5),
    "KVQ_PREFILL_BASE_MS": ("1.5", 1.5),
    "KVQ_PREFILL_BLOCK_MS": ("0.25", 0.25),
    "KVQ_DECODE_TOKEN_MS": ("30", 30.0),
    "KVQ_ENGINE": ("batched", "batched"),
    "KVQ_LATENCY": ("calibrated", "calibrated"),
    "KVQ_MAX_NUM_BATCHED_TOKENS": ("4096", 4096),
    "KVQ_MAX_NUM_SEQS": ("64", 64),
    "KVQ_RUN_TTL": ("3600", 3600.0),
    "KVQ_EVENTS_MAXLEN": ("500", 500),
    "KVQ_ON_WORKER_DEATH": ("fail", "fail"),
    "KVQ_MAX_OUTSTANDING": ("4", 4),
    "KVQ_INDEX": ("approximate", "approximate"),
}


def test_every_documented_env_var_has_an_example():
    assert set(ENV_EXAMPLES) == set(ENV_TO_FIELD)


@pytest.mark.parametrize("var", sorted(ENV_TO_FIELD))
def test_env_var_maps_onto_its_settings_field(var):
    raw, expected = ENV_EXAMPLES[var]
    settings = Settings.from_env({var: raw})
    assert getattr(settings, ENV_TO_FIELD[var]) == expected
    assert type(getattr(settings, ENV_TO_FIELD[var])) is type(expected)


def test_defaults_without_env_are_the_design_values():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.strategy == "cache_aware"
    assert settings.time_scale == 1.0
    assert settings.gpu_preset().num_blocks == 924
    assert settings.latency_model() == LatencyModel(5.0, 2.5, 15.0)


def test_empty_env_var_means_unset():
    assert Settings.from_env({"KVQ_NUM_BLOCKS": "", "ROUTING_STRATEGY": ""}) == Settings()


def test_flags_override_env():
    env = {"ROUTING_STRATEGY": "round_robin", "KVQ_NUM_BLOCKS": "100", "KVQ_TIME_SCALE": "0.5"}
    settings = Settings.from_env(env, strategy="least_loaded", num_blocks=50)
    assert settings.strategy == "least_loaded"
    assert settings.num_blocks == 50
    assert settings.time_scale == 0.5  # no flag given: the env value stays


def test_flag_given_as_none_keeps_the_env_value():
    settings = Settings.from_env({"ROUTING_STRATEGY": "round_robin"}, strategy=None)
    assert settings.strategy == "round_robin"


def test_env_overrides_reach_the_preset_and_the_latency_model():
    settings = Settings.from_env(
        {
            "KVQ_PRESET": "llama-3.1-8b",
            "KVQ_NUM_BLOCKS": "64",
            "KVQ_MAX_CONTEXT": "2048",
            "KVQ_PREFILL_BASE_MS": "1",
            "KVQ_PREFILL_BLOCK_MS": "2",
            "KVQ_DECODE_TOKEN_MS": "3",
        }
    )
    preset = settings.gpu_preset()
    assert (preset.model.name, preset.num_blocks, preset.max_context_tokens) == (
        "llama-3.1-8b",
        64,
        2048,
    )
    assert settings.latency_model().prefill_ms(4) == 9.0
    assert settings.latency_model().decode_ms(2) == 6.0


@pytest.mark.parametrize("raw", ["fast", "1e", "1,5"])
def test_non_numeric_env_value_is_rejected_naming_var_and_value(raw):
    with pytest.raises(ConfigError, match=rf"KVQ_TIME_SCALE='{raw}' is not a number"):
        Settings.from_env({"KVQ_TIME_SCALE": raw})


@pytest.mark.parametrize("value", ["0", "-4"])
def test_non_positive_num_blocks_is_rejected_naming_it(value):
    with pytest.raises(ConfigError, match=f"num_blocks must be positive, got {value}"):
        Settings.from_env({"KVQ_NUM_BLOCKS": value})
    with pytest.raises(ConfigError, match=f"got {value}"):
        Settings(num_blocks=int(value))


@pytest.mark.parametrize("value", [-1.0, -0.001])
def test_negative_time_scale_is_rejected_naming_it(value):
    with pytest.raises(ConfigError, match=f"time_scale must be >= 0, got {value}"):
        Settings(time_scale=value)
    with pytest.raises(ConfigError, match=f"got {value}"):
        Settings.from_env({}, time_scale=value)


def test_zero_time_scale_is_accepted_as_no_latency_emulation():
    assert Settings(time_scale=0.0).time_scale == 0.0


@pytest.mark.parametrize(
    "var", ["KVQ_PREFILL_BASE_MS", "KVQ_PREFILL_BLOCK_MS", "KVQ_DECODE_TOKEN_MS"]
)
def test_negative_latency_constant_is_rejected_naming_it(var):
    with pytest.raises(ConfigError, match=rf"{ENV_TO_FIELD[var]} must be >= 0, got -2.0"):
        Settings.from_env({var: "-2"})


@pytest.mark.parametrize("field", ["heartbeat_ttl_s", "pending_ttl_s"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_ttl_is_rejected_naming_it(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be positive, got {value}"):
        Settings(**{field: value})


@pytest.mark.parametrize(
    ("preset", "offending"), [("gpt-5", "gpt-5"), ("llama-2-13b@tpu-v9", "tpu-v9")]
)
def test_unknown_preset_in_env_is_rejected_naming_it(preset, offending):
    with pytest.raises(ConfigError, match=offending):
        Settings.from_env({"KVQ_PRESET": preset})


def test_empty_key_prefix_is_rejected():
    with pytest.raises(ConfigError, match="key_prefix"):
        Settings(key_prefix="")


def test_engine_settings_build_the_engine_and_its_vllm_limits():
    settings = Settings.from_env(
        {"KVQ_ENGINE": "batched", "KVQ_LATENCY": "calibrated", "KVQ_PRESET": "qwen2.5-7b@h100-80gb"}
    )
    engine = settings.engine_config()
    assert (engine.engine, engine.latency, engine.is_batched) == ("batched", "calibrated", True)
    config = engine.scheduler_config(settings.gpu_preset())
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (8192, 1024)
    assert Settings.from_env({}).engine_config().engine == "sequential"
    assert Settings.from_env({}).sequential_pricing() is None  # the seed's latency model
    assert Settings.from_env({"KVQ_LATENCY": "calibrated"}).sequential_pricing() is not None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVQ_ENGINE": "vllm"}, "unknown engine 'vllm'; valid: sequential, batched"),
        ({"KVQ_LATENCY": "fast"}, "unknown latency profile 'fast'; valid: seed, calibrated"),
        ({"KVQ_MAX_NUM_SEQS": "0"}, "max_num_seqs must be positive, got 0"),
        (
            {"KVQ_MAX_NUM_BATCHED_TOKENS": "128", "KVQ_MAX_NUM_SEQS": "256"},
            "max_num_seqs \\(256\\) exceeds max_num_batched_tokens \\(128\\)",
        ),
    ],
)
def test_bad_engine_settings_are_rejected_naming_the_value(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_commands_own_defaults_yield_to_the_environment_and_to_flags():
    defaults = {"engine": "batched", "latency_profile": "calibrated"}  # kvqueue sweep's
    assert Settings.from_env({}, defaults).engine_config() == EngineConfig("batched", "calibrated")
    from_env = Settings.from_env({"KVQ_ENGINE": "sequential"}, defaults)
    assert (from_env.engine, from_env.latency_profile) == ("sequential", "calibrated")
    flagged = Settings.from_env({"KVQ_ENGINE": "batched"}, defaults, engine="sequential")
    assert flagged.engine == "sequential"


def test_what_to_do_with_a_dead_workers_queue_is_reroute_or_fail() -> None:
    assert Settings().on_worker_death == "reroute"
    with pytest.raises(
        ConfigError, match="on_worker_death must be one of reroute, fail, got 'drop'"
    ):
        Settings.from_env({"KVQ_ON_WORKER_DEATH": "drop"})


@pytest.mark.parametrize("field", ["run_ttl_s", "events_maxlen"])
def test_run_data_and_the_event_stream_are_always_bounded(field) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be positive, got 0"):
        Settings(**{field: 0})


def test_max_outstanding_must_admit_a_request() -> None:
    assert Settings().max_outstanding is None  # the default queues without bound
    with pytest.raises(ConfigError, match="max_outstanding must be >= 1, got 0"):
        Settings.from_env({"KVQ_MAX_OUTSTANDING": "0"})


def test_the_event_stream_cap_defaults_agree() -> None:
    from kvqueue.routing.redis_index import DEFAULT_EVENTS_MAXLEN

    assert Settings().events_maxlen == DEFAULT_EVENTS_MAXLEN == 1_000
