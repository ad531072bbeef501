"""When a workload does not fit a preset: say so in one line, and name presets that fit.

A request fits a preset when its prompt is shorter than the context, its prompt plus
``max_tokens`` is within the context, and its KV blocks (prompt plus output, partial blocks
included) fit the cache — `kvqueue.workloads.traces.fits_report`'s rules. Every request
fits a preset exactly when the workload's longest prompt, longest prompt-plus-output and
largest block count do, so `presets_that_fit` compares three maxima with each preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvqueue.gpu.presets import Preset, all_presets
from kvqueue.gpu.request import Request
from kvqueue.workloads.traces import FitReport, needed_blocks

NUM_SUGGESTIONS = 3


@dataclass(frozen=True, slots=True)
class WorkloadExtent:
    """The largest demands of a workload's requests."""

    max_prompt_tokens: int
    max_total_tokens: int  # prompt + max_tokens (0 when unknown)
    max_blocks: int

    @classmethod
    def of(cls, requests: Sequence[Request]) -> WorkloadExtent:
        return cls(
            max((r.num_prompt_tokens for r in requests), default=0),
            max((r.num_prompt_tokens + (r.max_tokens or 0) for r in requests), default=0),
            max((needed_blocks(r) for r in requests), default=0),
        )

    def fits(self, preset: Preset) -> bool:
        context = preset.max_context_tokens
        return (
            self.max_prompt_tokens < context
            and self.max_total_tokens <= context
            and self.max_blocks <= preset.num_blocks
        )


def presets_that_fit(
    requests: Sequence[Request], current: Preset | None = None, limit: int = NUM_SUGGESTIONS
) -> list[Preset]:
    """Up to `limit` presets every request fits: the current model on other GPUs first, then
    other models; within each, the smallest KV cache first."""
    extent = WorkloadExtent.of(requests)
    same_model = current.model.name if current is not None else None
    fitting = [p for p in all_presets() if extent.fits(p)]
    fitting.sort(key=lambda p: (p.model.name != same_model, p.kv_tokens, p.name))
    return fitting[:limit]


def unfit_warning(fit: FitReport, preset: Preset, requests: Sequence[Request]) -> str | None:
    """One line about the requests `preset` can never serve, with presets that fit; None when
    every request fits."""
    if not fit.num_unfit:
        return None
    examples = "; ".join(f"{rid}: {reason}" for rid, reason in fit.examples[:2])
    line = (
        f"{fit.num_unfit:,} of {fit.num_requests:,} requests cannot fit {preset.name} "
        f"({preset.num_blocks:,} blocks, {preset.max_context_tokens:,}-token context) and will "
        f"end as rejected; e.g. {examples}"
    )
    suggestions = presets_that_fit(requests, preset)
    if suggestions:
        names = ", ".join(p.name for p in suggestions)
        return f"{line}. Presets that fit every request: {names} (--preset / KVQ_PRESET)"
    extent = WorkloadExtent.of(requests)
    context = max(extent.max_prompt_tokens + 1, extent.max_total_tokens)
    return (
        f"{line}. No preset fits every request (they need a {context:,}-token context and "
        f"{extent.max_blocks:,} KV blocks): shorten them with --length-scale, or cut the trace "
        "with --limit"
    )
