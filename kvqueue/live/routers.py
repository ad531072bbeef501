"""A live router for a strategy: its policy, the index it reads and the engine model it prices
with, over the Redis router state of the run's settings."""

from __future__ import annotations

import redis

from kvqueue.config import Settings
from kvqueue.routing.engine_model import EngineModel
from kvqueue.routing.policies.base import approximate_rules, make_policy, resolve_index_mode
from kvqueue.routing.router import Router
from kvqueue.routing.state import RedisRouterState


def live_router(client: redis.Redis, settings: Settings, strategy: str) -> Router:
    """`strategy` is ``name`` or ``name:index``; without an index, `settings.index_mode`, else
    the policy's upstream default. Unknown names or modes raise `ConfigError`."""
    name, mode = resolve_index_mode(strategy, settings.index_mode)
    policy = make_policy(name)
    state = RedisRouterState(
        client,
        settings.key_prefix,
        settings.heartbeat_ttl_s,
        settings.pending_ttl_s,
        time_scale=settings.time_scale,
        index_mode=mode,
        approximate=approximate_rules(policy),
    )
    latency = settings.latency_model()
    engine = EngineModel.of(settings.engine_config(), settings.gpu_preset(), latency)
    return Router(state, policy, latency, engine)
