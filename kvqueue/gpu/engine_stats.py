"""What one engine did over a run, recorded by its driver in the driver's own time (ms).

Plain counters and samples, no clock: the simulator feeds virtual times, a live worker would
feed wall-clock ones. `kvqueue.report.engine_metrics` turns them into the dashboard's figures.

- `num_steps` forward passes, `num_scheduled` requests summed over them (mean batch size =
  num_scheduled / num_steps), `busy_ms` their summed durations, `num_preemptions`;
- inter-token gaps (ITL): single values with a weight (how many tokens had that gap), and
  arithmetic series ``(first, growth, count, weight)`` — `count` gaps
  ``first, first + growth, …``, each for `weight` tokens (a decode run: every request of the
  batch gets one token per step, the steps lengthening as their context grows);
- `kv_usage`: ``(time, usage)`` samples, usage being the fraction of KV blocks pinned by
  running requests (evictable cached blocks count as free) just after the state changed.

A live worker records a run's stats in parts (`to_wire` of what it recorded since its last
report); `merge` puts the parts back together, in order, into the stats of the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_scheduled: int = 0
    busy_ms: float = 0.0
    num_preemptions: int = 0
    gap_values: list[float] = field(default_factory=list)
    gap_weights: list[int] = field(default_factory=list)
    gap_series: list[tuple[float, float, int, int]] = field(default_factory=list)
    kv_usage: list[tuple[float, float]] = field(default_factory=list)

    def record_steps(self, num_steps: int, batch_size: int, duration_ms: float) -> None:
        """`num_steps` steps of `batch_size` requests each, lasting `duration_ms` in all."""
        self.num_steps += num_steps
        self.num_scheduled += num_steps * batch_size
        self.busy_ms += duration_ms

    def record_gap(self, gap_ms: float, weight: int = 1) -> None:
        if weight:
            self.gap_values.append(gap_ms)
            self.gap_weights.append(weight)

    def record_gap_series(self, first_ms: float, growth_ms: float, count: int, weight: int) -> None:
        if count > 0 and weight > 0:
            self.gap_series.append((first_ms, growth_ms, count, weight))

    def record_kv_usage(self, time_ms: float, usage: float) -> None:
        """A sample; one equal to the previous is dropped (the usage is a step function)."""
        samples = self.kv_usage
        if samples and samples[-1][1] == usage:
            return
        if samples and samples[-1][0] == time_ms:
            samples[-1] = (time_ms, usage)
            return
        samples.append((time_ms, usage))

    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready record of these stats (`merge` reads it back)."""
        return {
            "steps": self.num_steps,
            "scheduled": self.num_scheduled,
            "busy_ms": self.busy_ms,
            "preemptions": self.num_preemptions,
            "gaps": [self.gap_values, self.gap_weights],
            "series": [list(s) for s in self.gap_series],
            "kv": [list(s) for s in self.kv_usage],
        }

    @property
    def is_empty(self) -> bool:
        return not (self.num_steps or self.num_preemptions or self.gap_values or self.kv_usage)

    @classmethod
    def merge(cls, parts: Iterable[Mapping[str, Any]]) -> EngineStats:
        """The stats of consecutive `to_wire` parts, as if recorded in one piece."""
        stats = cls()
        for part in parts:
            stats.num_steps += int(part["steps"])
            stats.num_scheduled += int(part["scheduled"])
            stats.busy_ms += float(part["busy_ms"])
            stats.num_preemptions += int(part["preemptions"])
            values, weights = part["gaps"]
            for value, weight in zip(values, weights, strict=True):
                stats.record_gap(float(value), int(weight))
            for first, growth, count, weight in part["series"]:
                stats.record_gap_series(float(first), float(growth), int(count), int(weight))
            samples = [(float(t), float(u)) for t, u in part["kv"]]
            if samples:  # the part's first sample follows the previous part's last
                stats.record_kv_usage(*samples[0])
                stats.kv_usage.extend(samples[1:])
        return stats
