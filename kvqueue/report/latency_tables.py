"""The calibrated latency profiles as markdown tables, for `docs/latency.md`.

    python -m kvqueue.report.latency_tables docs/latency.md

rewrites the generated blocks of the document (between ``<!-- generated:NAME:start -->`` and
``<!-- generated:NAME:end -->``) from `kvqueue/gpu/data/latency_profiles.json`: every preset's
coefficients with their source and derivation, and every reference point with the model's
value and its error. Everything else in the document is written by hand; a test checks the
blocks are current.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from kvqueue.gpu.profiles import (
    COEFFICIENTS,
    calibrated_step_cost,
    calibration,
    reference_points,
    reference_shape,
)

HEADINGS = {
    "alpha_ms": "α (ms)",
    "beta_seq_ms": "β_seq (ms/seq)",
    "beta_kv_ms_per_token": "β_kv (ms/token)",
    "alpha_prefill_ms": "α_p (ms)",
    "beta_prefill_ms_per_token": "β_p (ms/token)",
    "gamma_ms_per_token2": "γ (ms/token²)",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def coefficients_table() -> str:
    """One row per preset: its six coefficients."""
    presets = calibration()["presets"]
    lines = [
        "| preset | " + " | ".join(HEADINGS[c] for c in COEFFICIENTS) + " |",
        "|---" + "|--:" * len(COEFFICIENTS) + "|",
    ]
    for name in sorted(presets):
        values = " | ".join(f"{presets[name][c]:.6g}" for c in COEFFICIENTS)
        lines.append(f"| `{name}` | {values} |")
    return "\n".join(lines)


def sources_table() -> str:
    """One row per preset: where its coefficients come from, how, and what to keep in mind."""
    presets = calibration()["presets"]
    lines = ["| preset | source | derivation | caveats |", "|---|---|---|---|"]
    for name in sorted(presets):
        entry = presets[name]
        lines.append(
            f"| `{name}` | {_cell(entry['source'])} | {_cell(entry['derivation'])} "
            f"| {_cell(entry.get('caveats') or '–')} |"
        )
    return "\n".join(lines)


def _describe(point: dict) -> str:
    if point["kind"] == "prefill":
        cached = point.get("cached_tokens", 0)
        return f"prefill {point['prefill_tokens']:,} tokens" + (
            f" after {cached:,} cached" if cached else ""
        )
    return f"decode, batch {point['batch']}, context {point['context']:,}"


def reference_table() -> str:
    """Every reference point: the step, expected and modelled time, error, source."""
    lines = [
        "| preset | step | expected (ms) | model (ms) | error | kind | source |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for point in reference_points():
        model_ms = calibrated_step_cost(point["preset"]).step_ms(reference_shape(point))
        error = 100.0 * (model_ms - point["expected_ms"]) / point["expected_ms"]
        if point.get("pinned"):
            kind = "pinned"
        elif point["independent"]:
            kind = "independent"
        else:
            kind = "derived"
        lines.append(
            f"| `{point['preset']}` | {_describe(point)} | {point['expected_ms']:,.2f} "
            f"| {model_ms:,.2f} | {error:+.1f}% | {kind} | {_cell(point['source'])} |"
        )
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "coefficients": coefficients_table,
    "sources": sources_table,
    "reference-points": reference_table,
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"


def generated_blocks(text: str) -> dict[str, str]:
    """The current content of each generated block of a document."""
    found = {}
    for name in BLOCKS:
        start, end = markers(name)
        i, j = text.find(start), text.find(end)
        if 0 <= i < j:
            found[name] = text[i + len(start) : j].strip("\n")
    return found


def refresh(text: str) -> str:
    """`text` with every generated block rewritten; a missing marker pair raises ValueError."""
    for name, render in BLOCKS.items():
        start, end = markers(name)
        i, j = text.find(start), text.find(end)
        if not 0 <= i < j:
            raise ValueError(f"no {start} … {end} block in the document")
        text = text[: i + len(start)] + "\n" + render() + "\n" + text[j:]
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvqueue.report.latency_tables docs/latency.md", file=sys.stderr)
        return 2
    path = Path(args[0])
    path.write_text(refresh(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the generated tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
