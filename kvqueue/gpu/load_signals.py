"""What an engine exports about its load, as a real one does, for routers to read.

The fields follow vLLM's scheduler metrics (vLLM 0.11.0, `vllm/v1/metrics/loggers.py`, from
`Scheduler.make_stats` in `vllm/v1/core/sched/scheduler.py`), taken after a step:

- `num_running`: ``vllm:num_requests_running`` — requests holding KV blocks in the batch;
- `num_waiting`: ``vllm:num_requests_waiting`` — queued, preempted ones included;
- `kv_usage`: ``vllm:kv_cache_usage_perc`` as a fraction, ``1 − free / total`` where free
  blocks *include evictable cached ones* (`BlockPool.get_usage`): only blocks pinned by
  running requests count as used;
- `num_queued_prefill_tokens`: prompt tokens (and, for a preempted request, its outputs to
  recompute) not yet computed, over waiting and running requests; prefix hits of waiting
  requests are not subtracted (they are only known at admission).

A live worker publishes them as one JSON object (`to_json`), keyed by these field names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import orjson


@dataclass(frozen=True, slots=True)
class LoadSignals:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_queued_prefill_tokens: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LoadSignals:
        """Signals as `to_json` wrote them; fields this version does not know are ignored."""
        data = orjson.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
