"""`kvqueue sweep` in local processes: the answers, the defaults, the report files, bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from kvqueue.cli import main
from kvqueue.errors import ConfigError
from kvqueue.gpu.engines import EngineConfig
from kvqueue.gpu.latency import LatencyModel
from kvqueue.report.capacity import SATURATION_DEPTH
from kvqueue.report.dashboard import DASHBOARD_FILE
from kvqueue.report.html import REPORT_FILE
from kvqueue.report.recommend import recommendation
from kvqueue.report.slo import Slo
from kvqueue.report.sweep import DEFAULT_RATE_FRACTIONS, round_significant
from kvqueue.report.sweep_plots import GOODPUT_FILE, KV_USAGE_FILE, P99_FILE, TRADEOFF_FILE
from kvqueue.report.sweep_spec import SweepSpec
from kvqueue.workloads.synthetic import SHARED_PREFIX_PRESETS

STRATEGIES = ["round_robin", "cache_aware", "predictive"]


def sweep(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["sweep", *args])
    captured = capsys.readouterr()
    result = orjson.loads(captured.out) if code == 0 and "--json" in args else {}
    return code, result, captured.err


def check_answers(result: dict[str, Any]) -> None:
    """What every sweep result must satisfy, whatever its engine."""
    for cell in result["cells"]:
        assert 0.0 <= cell["attainment"] <= 1.0
        assert cell["goodput_rps"] <= cell["throughput_rps"] + 1e-9
        assert cell["overloaded"] == (cell["rate_rps"] > cell["capacity_rps"])
    for row in result["sustained"]:
        own = [c for c in result["cells"] if c["strategy"] == row["strategy"]]
        met = [c["rate_rps"] for c in own if c["rate_rps"] <= (row["rate_rps"] or 0)]
        assert all(
            c["attainment"] >= 0.9 and not c["overloaded"] for c in own if c["rate_rps"] in met
        )
    for row in result["capacity"]:
        assert row["saturated"] and row["depth"] >= SATURATION_DEPTH


def test_sweep_runs_the_batched_engine_by_default_and_says_so_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    code, result, _ = sweep(
        capsys, "--workload", "shared-prefix-tiny", "--rates", "50,150,300",
        "--strategies", ",".join(STRATEGIES), "--slo-ttft", "2000", "--json", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert [(r["strategy"], r["num_workers"]) for r in result["sustained"]] == [
        (s, 4) for s in STRATEGIES
    ]
    assert result["meta"]["slo"]["ttft_ms"] == 2000.0
    meta = result["meta"]
    assert (meta["engine"], meta["latency_profile"]) == ("batched", "calibrated")
    assert (meta["max_num_batched_tokens"], meta["max_num_seqs"]) == (2048, 256)  # A100
    assert len(result["cells"]) == 3 * 3
    check_answers(result)
    capacity = {row["strategy"]: row for row in result["capacity"]}
    # Batching: a 16-request workload is repeated until each GPU queues many batches.
    assert all(row["copies"] > 1 and row["mean_batch_size"] > 1 for row in capacity.values())
    # Shared prefixes let more requests share a GPU's KV cache: affinity raises capacity.
    assert capacity["cache_aware"]["measured_rps"] > 1.5 * capacity["round_robin"]["measured_rps"]
    rates = {r["strategy"]: r["rate_rps"] for r in result["sustained"]}
    assert rates["round_robin"] < rates["cache_aware"]
    assert "(batched engine, calibrated latency)" in result["recommendation"][0]
    assert orjson.loads((out / DASHBOARD_FILE).read_bytes()) == result
    for name in (REPORT_FILE, GOODPUT_FILE, P99_FILE, TRADEOFF_FILE, KV_USAGE_FILE):
        assert (out / name).stat().st_size > 0, name
    report = (out / REPORT_FILE).read_text()
    assert "batched engine (continuous batching with vLLM&#x27;s scheduling" in report
    assert "calibrated step-time model" in report


def test_sweep_on_the_sequential_engine_finds_its_lower_capacity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, _ = sweep(
        capsys, "--workload", "shared-prefix-tiny", "--rates", "1,2,4,16",
        "--strategies", ",".join(STRATEGIES), "--slo-ttft", "2000", "--engine", "sequential",
        "--latency", "seed", "--json", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    assert (result["meta"]["engine"], result["meta"]["latency_profile"]) == ("sequential", "seed")
    check_answers(result)
    assert all(row["mean_batch_size"] == 1 for row in result["capacity"])  # one at a time
    # 16 req/s is far beyond what 4 GPUs serving one request at a time can take.
    assert all(c["overloaded"] for c in result["cells"] if c["rate_rps"] == 16)
    assert all(r["rate_rps"] is None or r["rate_rps"] < 16 for r in result["sustained"])
    assert result["recommendation"][0].startswith("On shared-prefix-tiny with 4 × llama-2-13b")
    assert "(sequential engine, seed latency)" in result["recommendation"][0]
    report = (tmp_path / REPORT_FILE).read_text()
    assert "sequential engine (one request at a time per GPU, FIFO)" in report


def test_the_default_slo_is_sized_from_requests_served_on_an_idle_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, err = sweep(
        capsys, "--workload", "shared-prefix-tiny", "--rates", "1", "--strategies", "round_robin",
        "--engine", "sequential", "--latency", "seed", "--json", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    tiny = SHARED_PREFIX_PRESETS["shared-prefix-tiny"]
    blocks = (tiny["system_prompt_len"] + tiny["question_len"]) // 16
    tokens = tiny["output_len"]
    idle_ttft = LatencyModel().prefill_ms(blocks)  # nothing cached, nothing queued
    idle_tpot = LatencyModel().decode_ms(tokens) / (tokens - 1)
    slo = result["meta"]["slo"]
    assert slo["ttft_ms"] == round_significant(5 * idle_ttft, up=True)
    assert slo["tpot_ms"] == round_significant(2 * idle_tpot, up=True)
    assert "sized to the workload" in err


def test_default_rates_run_from_light_load_to_beyond_the_measured_capacity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, _ = sweep(
        capsys, "--workload", "shared-prefix-tiny", "--strategies", "round_robin,cache_aware",
        "--workers", "2", "--slo-ttft", "1000", "--slo-tpot", "50", "--json",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    best = max(c["measured_rps"] for c in result["capacity"])
    rates = result["meta"]["rates_by_workers"]["2"]
    assert rates[0] == pytest.approx(min(DEFAULT_RATE_FRACTIONS) * best, rel=0.05)
    assert rates[-1] == pytest.approx(max(DEFAULT_RATE_FRACTIONS) * best, rel=0.05)
    assert any(c["overloaded"] for c in result["cells"])
    assert any(not c["overloaded"] for c in result["cells"])


def test_a_target_rate_finds_the_fewest_gpus_that_serve_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, _ = sweep(
        capsys, "--workload", "no-sharing", "--num-requests", "48", "--strategies", "round_robin",
        "--rates", "0.5", "--workers", "1", "--target-rate", "3", "--target-workers", "1,2,3,4",
        "--slo-ttft", "5000", "--slo-tpot", "50", "--engine", "sequential", "--latency", "seed",
        "--json", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    at_target = {
        c["num_workers"]: c
        for c in result["cells"]
        if c["rate_rps"] == 3.0 and c["strategy"] == "round_robin"
    }
    assert sorted(at_target) == [1, 2, 3, 4]
    # One GPU serving one request at a time (~0.6 s each) cannot take 3 req/s.
    assert at_target[1]["overloaded"]
    fewest = result["fewest_gpus"]["by_strategy"]["round_robin"]
    assert fewest is not None and fewest >= 2
    assert at_target[fewest]["attainment"] >= 0.9 and not at_target[fewest]["overloaded"]
    assert all(at_target[w]["attainment"] < 0.9 for w in at_target if w < fewest)
    assert any(line.startswith("At 3 req/s") for line in result["recommendation"])


def test_cells_give_the_same_numbers_in_one_process_or_several(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--workload", "shared-prefix-tiny", "--rates", "1,3", "--slo-ttft", "800", "--json"]
    _, serial, _ = sweep(capsys, *common, "--jobs", "1", "--out", str(tmp_path / "a"))
    _, forked, _ = sweep(capsys, *common, "--jobs", "3", "--out", str(tmp_path / "b"))
    assert serial["cells"] == forked["cells"]
    assert serial["sustained"] == forked["sustained"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-num-seqs", "0"], "max_num_seqs must be positive, got 0"),
        (["--rate", "3"], "a sweep sets the arrival rate itself: give --rates, not --rate"),
        (["--rates", "2,0"], "rates must be positive numbers of requests/s, got 0.0"),
        (["--rates", "two"], "--rates must be comma-separated numbers, got 'two'"),
        (["--workers", "0"], "worker counts must be >= 1, got [0]"),
        (["--workers", "2,4,2"], "worker counts given more than once: [2]"),
        (["--strategies", "nope"], "unknown"),
        (["--slo-ttft", "-5"], "ttft_ms must be a positive number of ms, got -5.0"),
        (["--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    ],
)
def test_bad_input_gets_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = sweep(capsys, *args, "--out", str(tmp_path))
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / DASHBOARD_FILE).exists()


# -- the recommendation, on hand-made results ------------------------------------------------
def hand_made(
    rates: dict[str, float | None],
    bounded: bool = True,
    fewest: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    return {
        "meta": {
            "workload": "w",
            "preset": "p",
            "engine": "sequential",
            "latency_profile": "seed",
            "strategies": list(rates),
            "workers": [4],
        },
        "sustained": [
            {
                "strategy": s,
                "num_workers": 4,
                "rate_rps": r,
                "bounded": bounded,
                "lowest_tested_rps": 1.0,
            }
            for s, r in rates.items()
        ],
        "fewest_gpus": None
        if fewest is None
        else {"target_rate_rps": 10.0, "workers_tested": [1, 2, 4, 8], "by_strategy": fewest},
        "cells": [],
        "capacity": [],
    }


def test_the_recommendation_compares_the_best_policy_with_round_robin() -> None:
    lines = recommendation(hand_made({"round_robin": 2.0, "cache_aware": 3.0, "predictive": 4.2}))
    assert lines[0] == (
        "On w with 4 × p (sequential engine, seed latency), predictive sustains 2.1× "
        "round_robin's rate within the SLO: 4.2 req/s against 2 req/s."
    )


def test_a_limit_never_reached_is_said_to_be_at_least() -> None:
    lines = recommendation(hand_made({"round_robin": 2.0, "predictive": 4.0}, bounded=False))
    assert "at least 2× round_robin's rate" in lines[0]
    assert "at least 4 req/s" in lines[0]


def test_the_gpus_saved_at_the_target_rate() -> None:
    lines = recommendation(
        hand_made(
            {"round_robin": 2.0, "predictive": 4.0}, fewest={"round_robin": 8, "predictive": 4}
        )
    )
    assert lines[1] == (
        "At 10 req/s, predictive needs 4 GPUs and round_robin 8: cache-aware routing saves 4 GPUs."
    )


def test_when_no_policy_meets_the_slo_the_recommendation_says_what_to_change() -> None:
    lines = recommendation(hand_made({"round_robin": None, "predictive": None}))
    assert lines[0].startswith("No policy meets the SLO on w")
    assert "even at the lowest rate tested (1 req/s)" in lines[0]


def test_round_significant_rounds_to_two_digits() -> None:
    assert round_significant(7.456) == 7.5
    assert round_significant(1234.0) == 1200.0
    assert round_significant(0.04449) == 0.044
    assert round_significant(241.0, up=True) == 250.0
    assert math.isinf(round_significant(math.inf))


def test_a_sweep_spec_crosses_json_with_its_engine_whole() -> None:
    engine = EngineConfig("batched", "calibrated", max_num_batched_tokens=512, max_num_seqs=8)
    spec = SweepSpec(
        workload_args={"workload": "shared-prefix-tiny", "seed": 1},
        hash_seed="kvqueue",
        tokenizer=None,
        preset="llama-3.1-8b@h100-80gb",
        num_blocks=None,
        max_context_tokens=None,
        latency={"prefill_base_ms": 5.0, "prefill_per_block_ms": 2.5, "decode_per_token_ms": 15.0},
        engine=engine,
        pending_ttl_ms=30_000.0,
        decode_model=None,
        slo=Slo(500.0, 40.0),
    )
    assert SweepSpec.from_dict(orjson.loads(orjson.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match=r"unknown engine setting\(s\) \['warp'\]"):
        EngineConfig.from_dict({"engine": "batched", "warp": 9})
