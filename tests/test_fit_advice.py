"""A workload that does not fit its preset is told which presets it fits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvqueue.gpu.presets import get_preset
from kvqueue.workloads.fit_advice import presets_that_fit, unfit_warning
from kvqueue.workloads.traces import fits_report

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_suggested_preset_fits_every_request(make_request) -> None:
    requests = [make_request(5_000, max_tokens=10), make_request(100)]
    preset = get_preset()  # llama-2-13b: a 4,096-token context
    fit = fits_report(requests, preset.max_context_tokens, preset.num_blocks)
    assert fit.num_unfit == 1
    suggestions = presets_that_fit(requests, preset)
    assert suggestions
    for suggestion in suggestions:
        assert (
            fits_report(requests, suggestion.max_context_tokens, suggestion.num_blocks).num_unfit
            == 0
        )
    warning = unfit_warning(fit, preset, requests)
    assert warning is not None
    assert warning.startswith("1 of 2 requests cannot fit llama-2-13b@a100-40gb")
    assert f"Presets that fit every request: {suggestions[0].name}" in warning


def test_the_same_model_on_a_larger_cache_comes_first(make_request) -> None:
    requests = [make_request(3_000)]  # fits the context, not a 100-block cache
    preset = get_preset("llama-2-13b", num_blocks=100)
    first = presets_that_fit(requests, preset)[0]
    assert first.model.name == "llama-2-13b"


def test_when_no_preset_fits_the_warning_says_how_to_shrink_the_requests(make_request) -> None:
    requests = [make_request(1_100_000)]
    preset = get_preset()
    fit = fits_report(requests, preset.max_context_tokens, preset.num_blocks)
    warning = unfit_warning(fit, preset, requests)
    assert presets_that_fit(requests, preset) == []
    assert warning is not None
    assert "No preset fits every request (they need a 1,100,001-token context" in warning
    assert "--length-scale" in warning


def test_a_fitting_workload_gets_no_warning(make_request) -> None:
    requests = [make_request(100)]
    preset = get_preset()
    assert unfit_warning(fits_report(requests, 4_096, 924), preset, requests) is None


def test_simulate_names_a_preset_that_fits_a_trace_too_long_for_it(tmp_path: Path) -> None:
    trace = REPO_ROOT / "tests" / "fixtures" / "mooncake_small.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "kvqueue", "simulate", "--trace", str(trace), "--json",
         "--preset", "llama-2-7b", "--max-context", "1000", "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "cannot fit" in line]
    assert len(warning) == 1 and "Presets that fit every request:" in warning[0]
