"""Settings: one frozen dataclass, defaults in one place, read from the environment.

| variable            | field              | default                         |
|---------------------|--------------------|---------------------------------|
| REDIS_URL           | redis_url          | redis://127.0.0.1:6379/0        |
| KVQ_PREFIX          | key_prefix         | kvq:                            |
| ROUTING_STRATEGY    | strategy           | cache_aware                     |
| KVQ_TIME_SCALE      | time_scale         | 1.0                             |
| KVQ_PRESET          | preset             | llama-2-13b@a100-40gb           |
| KVQ_NUM_BLOCKS      | num_blocks         | (derived from the preset)       |
| KVQ_MAX_CONTEXT     | max_context_tokens | (the model's)                   |
| KVQ_HASH_SEED       | hash_seed          | kvqueue                         |
| KVQ_TOKENIZER       | tokenizer          | (the offline default)           |
| KVQ_DECODE_MODEL    | decode_model       | (none: request length/fallback) |
| KVQ_HEARTBEAT_TTL   | heartbeat_ttl_s    | 15                              |
| KVQ_PENDING_TTL     | pending_ttl_s      | 30                              |
| KVQ_PREFILL_BASE_MS | prefill_base_ms    | 5.0                             |
| KVQ_PREFILL_BLOCK_MS| prefill_per_block_ms | 2.5                           |
| KVQ_DECODE_TOKEN_MS | decode_per_token_ms  | 15.0                          |
| KVQ_ENGINE          | engine             | sequential (or batched)         |
| KVQ_LATENCY         | latency_profile    | seed (or calibrated)            |
| KVQ_MAX_NUM_BATCHED_TOKENS | max_num_batched_tokens | (vLLM's default for the GPU) |
| KVQ_MAX_NUM_SEQS    | max_num_seqs       | (vLLM's default for the GPU)    |
| KVQ_RUN_TTL         | run_ttl_s          | 86400 (a run's data, seconds)   |
| KVQ_EVENTS_MAXLEN   | events_maxlen      | 1000 (cache-event stream cap)   |
| KVQ_ON_WORKER_DEATH | on_worker_death    | reroute (or fail)               |
| KVQ_MAX_OUTSTANDING | max_outstanding    | (none: queues are unbounded)    |
| KVQ_INDEX           | index_mode         | (each policy's upstream's: precise or approximate) |

CLI flags override these by passing keyword arguments to `Settings.from_env(**overrides)`; a
command whose defaults differ (``kvqueue sweep`` runs the batched engine) passes them as
`defaults`, which the environment and the flags still override.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import DEFAULT_ENGINE, EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.gpu.presets import DEFAULT_PRESET, Preset, get_preset
from kvqueue.gpu.profiles import DEFAULT_LATENCY_PROFILE, SequentialStepPricing

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

ENV_TO_FIELD = {
    "REDIS_URL": "redis_url",
    "KVQ_PREFIX": "key_prefix",
    "ROUTING_STRATEGY": "strategy",
    "KVQ_TIME_SCALE": "time_scale",
    "KVQ_PRESET": "preset",
    "KVQ_NUM_BLOCKS": "num_blocks",
    "KVQ_MAX_CONTEXT": "max_context_tokens",
    "KVQ_HASH_SEED": "hash_seed",
    "KVQ_TOKENIZER": "tokenizer",
    "KVQ_DECODE_MODEL": "decode_model",
    "KVQ_HEARTBEAT_TTL": "heartbeat_ttl_s",
    "KVQ_PENDING_TTL": "pending_ttl_s",
    "KVQ_PREFILL_BASE_MS": "prefill_base_ms",
    "KVQ_PREFILL_BLOCK_MS": "prefill_per_block_ms",
    "KVQ_DECODE_TOKEN_MS": "decode_per_token_ms",
    "KVQ_ENGINE": "engine",
    "KVQ_LATENCY": "latency_profile",
    "KVQ_MAX_NUM_BATCHED_TOKENS": "max_num_batched_tokens",
    "KVQ_MAX_NUM_SEQS": "max_num_seqs",
    "KVQ_RUN_TTL": "run_ttl_s",
    "KVQ_EVENTS_MAXLEN": "events_maxlen",
    "KVQ_ON_WORKER_DEATH": "on_worker_death",
    "KVQ_MAX_OUTSTANDING": "max_outstanding",
    "KVQ_INDEX": "index_mode",
}

# What happens to the requests queued on a worker whose heartbeat expired.
ON_WORKER_DEATH = ("reroute", "fail")


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "kvq:"
    strategy: str = "cache_aware"
    time_scale: float = 1.0
    preset: str = DEFAULT_PRESET
    num_blocks: int | None = None
    max_context_tokens: int | None = None
    hash_seed: str = "kvqueue"
    tokenizer: str | None = None
    decode_model: str | None = None
    heartbeat_ttl_s: float = 15.0
    pending_ttl_s: float = 30.0
    prefill_base_ms: float = 5.0
    prefill_per_block_ms: float = 2.5
    decode_per_token_ms: float = 15.0
    engine: str = DEFAULT_ENGINE
    latency_profile: str = DEFAULT_LATENCY_PROFILE
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    run_ttl_s: float = 86_400.0
    events_maxlen: int = 1_000  # as kvqueue.routing.redis_index.DEFAULT_EVENTS_MAXLEN
    on_worker_death: str = "reroute"
    max_outstanding: int | None = None
    index_mode: str | None = None  # checked where a router is built (kvqueue.routing)

    def __post_init__(self) -> None:
        if not self.time_scale >= 0:
            raise ConfigError(f"time_scale must be >= 0, got {self.time_scale}")
        for name in ("heartbeat_ttl_s", "pending_ttl_s", "run_ttl_s", "events_maxlen"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.on_worker_death not in ON_WORKER_DEATH:
            raise ConfigError(
                f"on_worker_death must be one of {', '.join(ON_WORKER_DEATH)}, "
                f"got {self.on_worker_death!r}"
            )
        if self.max_outstanding is not None and self.max_outstanding < 1:
            raise ConfigError(f"max_outstanding must be >= 1, got {self.max_outstanding}")
        if not self.key_prefix:
            raise ConfigError("key_prefix must not be empty")
        self.latency_model()  # validates the latency constants
        self.engine_config().check(self.gpu_preset())  # the preset, its overrides, the engine

    def gpu_preset(self) -> Preset:
        return get_preset(self.preset, self.num_blocks, self.max_context_tokens)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            self.engine, self.latency_profile, self.max_num_batched_tokens, self.max_num_seqs
        )

    def sequential_pricing(self) -> SequentialStepPricing | None:
        """How the sequential engine prices requests (None: the seed's latency model)."""
        return self.engine_config().sequential_pricing(self.gpu_preset())

    def latency_model(self) -> LatencyModel:
        return LatencyModel(
            self.prefill_base_ms, self.prefill_per_block_ms, self.decode_per_token_ms
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        """Apply CLI flags; None means "not given" and keeps the current value."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Settings:
        env = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = dict(defaults or {})
        for var, name in ENV_TO_FIELD.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = _parse(var, raw, str(types[name]))
        return cls(**values).with_overrides(**overrides)


def _parse(var: str, raw: str, type_name: str) -> Any:
    try:
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("int"):
            return int(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    return raw
