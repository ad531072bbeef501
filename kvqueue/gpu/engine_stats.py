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
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
