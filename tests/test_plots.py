"""Plots from a hand-made small results set: every PNG is written, valid, and readable.

The data: two strategies on two workers, four requests each, plus a strategy whose every
request was rejected (the plots must draw it as "no completed requests", not crash).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from kvqueue.gpu.request import Request, make_request
from kvqueue.gpu.results import RequestResult, RequestStatus
from kvqueue.report.dashboard import build_dashboard, write_run
from kvqueue.report.plots import PLOT_FILES, strategy_colors, write_plots

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKERS = ["worker-0", "worker-1"]


def make_requests() -> list[Request]:
    """Four 4-block requests: r0/r1 share their first 3 blocks, r2/r3 theirs."""
    shared_a = [bytes([1, i]) * 16 for i in range(3)]
    shared_b = [bytes([2, i]) * 16 for i in range(3)]
    return [
        make_request("r0", [*shared_a, b"\x10" * 32], max_tokens=8, arrival_ms=0.0),
        make_request("r1", [*shared_a, b"\x11" * 32], max_tokens=8, arrival_ms=100.0),
        make_request("r2", [*shared_b, b"\x12" * 32], max_tokens=8, arrival_ms=200.0),
        make_request("r3", [*shared_b, b"\x13" * 32], max_tokens=8, arrival_ms=300.0),
    ]


def completed(
    request: Request,
    strategy: str,
    worker: str,
    hit_blocks: int,
    start_ms: float,
    wait_ms: float,
    used_blocks: int,
    evictions: int = 0,
) -> RequestResult:
    prefill = 5.0 + 2.5 * (request.num_blocks - hit_blocks)
    decode = 15.0 * 8
    return RequestResult(
        request_id=request.request_id,
        run_id=f"run-{strategy}",
        worker=worker,
        strategy=strategy,
        status=RequestStatus.COMPLETED,
        arrival_ms=start_ms - wait_ms,
        start_ms=start_ms,
        finish_ms=start_ms + prefill + decode,
        queue_wait_ms=wait_ms,
        prefill_ms=prefill,
        decode_ms=decode,
        ttft_ms=wait_ms + prefill,
        e2e_ms=wait_ms + prefill + decode,
        num_prompt_tokens=request.num_prompt_tokens,
        num_blocks=request.num_blocks,
        hit_blocks=hit_blocks,
        decode_tokens=8,
        decode_source="request",
        evictions=evictions,
        cache_used_blocks=used_blocks,
        cache_capacity_blocks=8,
    )


def rejected(request: Request, strategy: str) -> RequestResult:
    return RequestResult(
        request_id=request.request_id,
        run_id=f"run-{strategy}",
        worker="worker-0",
        strategy=strategy,
        status=RequestStatus.REJECTED,
        reason="prompt needs 4 blocks; worker-0 holds 2",
        num_prompt_tokens=request.num_prompt_tokens,
        num_blocks=request.num_blocks,
    )


@pytest.fixture
def run_data() -> tuple[dict, dict[str, list[RequestResult]]]:
    r0, r1, r2, r3 = make_requests()
    results = {
        # Affinity: each pair on one worker, the second of each hits 3 blocks.
        "cache_aware": [
            completed(r0, "cache_aware", "worker-0", 0, 0.0, 0.0, 4),
            completed(r1, "cache_aware", "worker-0", 3, 140.0, 40.0, 5),
            completed(r2, "cache_aware", "worker-1", 0, 200.0, 0.0, 4),
            completed(r3, "cache_aware", "worker-1", 3, 340.0, 40.0, 5),
        ],
        # Alternating: pairs split across workers, nothing hits; worker-1 evicts.
        "round_robin": [
            completed(r0, "round_robin", "worker-0", 0, 0.0, 0.0, 4),
            completed(r1, "round_robin", "worker-1", 0, 100.0, 0.0, 4),
            completed(r2, "round_robin", "worker-0", 0, 200.0, 0.0, 8),
            completed(r3, "round_robin", "worker-1", 0, 300.0, 0.0, 8, evictions=2),
        ],
        "tiny_gpu": [rejected(r, "tiny_gpu") for r in (r0, r1, r2, r3)],
    }
    dashboard = build_dashboard(results, [r0, r1, r2, r3], WORKERS, {"workload": "hand-made"})
    return dashboard, results


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert height >= 300 and width >= 500, f"{path} is only {width}×{height}"
    assert image.std() > 0.01, f"{path} is blank"


def test_hand_made_dashboard_numbers(run_data: tuple[dict, dict]) -> None:
    """The data the plots draw: 6 of 16 blocks hit under cache_aware, none under round_robin."""
    dashboard, _ = run_data
    assert dashboard["strategies"]["cache_aware"]["hit_rate"] == pytest.approx(6 / 16)
    assert dashboard["strategies"]["round_robin"]["hit_rate"] == 0.0
    assert dashboard["ideal_hit_rate"] == pytest.approx(6 / 16)
    assert dashboard["strategies"]["tiny_gpu"]["completed"] == 0


def test_write_plots_writes_every_png(tmp_path: Path, run_data: tuple[dict, dict]) -> None:
    dashboard, results = run_data
    paths = write_plots(tmp_path, dashboard, results)
    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        assert_valid_png(path)


def test_plots_of_a_run_without_any_completed_request(tmp_path: Path) -> None:
    requests = make_requests()
    results = {"only_rejections": [rejected(r, "only_rejections") for r in requests]}
    dashboard = build_dashboard(results, requests, WORKERS)
    for path in write_plots(tmp_path, dashboard, results):
        assert_valid_png(path)


def test_analysis_plots_entry_point(tmp_path: Path, run_data: tuple[dict, dict]) -> None:
    dashboard, results = run_data
    write_run(tmp_path, dashboard, results)
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "analysis" / "plots.py"), "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.split()]
    assert {p.name for p in printed} == set(PLOT_FILES)
    for path in printed:
        assert_valid_png(path)


def test_analysis_plots_entry_point_without_a_dashboard(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "analysis" / "plots.py"), "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "dashboard_results.json" in done.stderr


def test_strategy_colors_are_stable_and_distinct() -> None:
    colors = strategy_colors(["cache_aware", "round_robin", "least_loaded"])
    assert len(set(colors.values())) == 3
    assert colors == strategy_colors(["cache_aware", "round_robin", "least_loaded"])
