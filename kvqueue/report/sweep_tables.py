"""The tables of a sweep result, for the terminal and the HTML report alike.

- `sustained_table`: the highest rate each policy sustains within the SLO per cluster size,
  next to the capacity measured by its saturating burst (and, on a batching engine, the mean
  batch it ran at) and the ratio to the baseline;
- `fewest_gpus_table`: with a target rate, the fewest GPUs each policy needs for it;
- `cells_table`: every cell, overloaded ones marked ``!`` in the load column (offered rate /
  measured capacity) and summed up in one line under the table; on the sequential engine the
  share of GPU time busy, on a batching engine the mean batch and KV-cache usage instead
  (a batching GPU is "busy" with one request as with a hundred).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvqueue.gpu.engines import engine_label
from kvqueue.report.recommend import baseline_of, overload_summary
from kvqueue.report.table import Table
from kvqueue.report.units import format_count, format_ms, format_rate, format_share

SEQUENTIAL = "sequential"


def _rate_cell(row: Mapping[str, Any]) -> str:
    if row["rate_rps"] is None:
        return f"< {format_rate(row['lowest_tested_rps'])}"
    return format_rate(row["rate_rps"]) if row["bounded"] else f"≥ {format_rate(row['rate_rps'])}"


def sustained_table(result: Mapping[str, Any]) -> Table:
    meta = result["meta"]
    baseline = baseline_of(meta["strategies"])
    capacity = {(c["strategy"], c["num_workers"]): c for c in result["capacity"]}
    batching = meta["engine"] != SEQUENTIAL
    base = {
        r["num_workers"]: r["rate_rps"] for r in result["sustained"] if r["strategy"] == baseline
    }
    rows = []
    for r in result["sustained"]:
        ratio = (
            f"{r['rate_rps'] / base[r['num_workers']]:.2f}×"
            if r["rate_rps"] and base.get(r["num_workers"])
            else "-"
        )
        measured = capacity.get((r["strategy"], r["num_workers"])) or {}
        row = (
            r["strategy"],
            format_count(r["num_workers"]),
            _rate_cell(r),
            ratio,
            r.get("limited_by") or "-",
            format_rate(measured.get("measured_rps")),
        )
        batch = measured.get("mean_batch_size")
        rows.append((*row, "-" if batch is None else f"{batch:.0f}") if batching else row)
    columns: tuple[tuple[str, str], ...] = (
        ("strategy", "<"),
        ("GPUs", ">"),
        ("max rate in SLO", ">"),
        (f"vs {baseline}", ">"),
        ("next rate fails", ">"),
        ("capacity", ">"),
    )
    if batching:
        columns += (("batch at capacity", ">"),)
    attainment = meta["slo"]["attainment"]
    notes = (
        f"rates in req/s; max rate in SLO = highest rate tested with ≥ {100 * attainment:g}% of "
        "requests within the SLO (≥: every rate tested met it; <: none did); next rate fails "
        "on the SLO, or on capacity (offered more than the cluster takes); capacity = "
        "throughput of a saturating burst, the workload at once, repeated until each GPU "
        "queues many batches (measured)"
        + ("; batch at capacity = requests per step in that burst" if batching else ""),
    )
    return Table("Highest rate sustained within the SLO", columns, tuple(rows), notes)


def fewest_gpus_table(result: Mapping[str, Any]) -> Table | None:
    fewest = result.get("fewest_gpus")
    if not fewest:
        return None
    tested = ", ".join(str(w) for w in fewest["workers_tested"])
    rows = tuple(
        (name, "none tested" if needs is None else format_count(needs))
        for name, needs in fewest["by_strategy"].items()
    )
    rate = format_rate(fewest["target_rate_rps"])
    return Table(
        f"Fewest GPUs for {rate} req/s within the SLO",
        (("strategy", "<"), ("GPUs", ">")),
        rows,
        (f"cluster sizes tested: {tested}",),
    )


def cells_table(result: Mapping[str, Any]) -> Table:
    batching = result["meta"]["engine"] != SEQUENTIAL
    rows = []
    marked = set()
    for index, c in enumerate(result["cells"]):
        load = "-" if c["load"] is None else f"{c['load']:.2f}"
        if c["overloaded"]:
            load += " !"
            marked.add(index)
        ttft, tpot = c["ttft_ms"], c["tpot_ms"]
        counts = (c["completed"], c["rejected"], c["failed"])
        rows.append(
            (
                c["strategy"],
                format_count(c["num_workers"]),
                format_rate(c["rate_rps"]),
                load,
                format_share(c["hit_rate"]),
                format_ms(ttft["p50"]),
                format_ms(ttft["p99"]),
                format_ms(tpot["p99"]),
                format_share(c["attainment"]),
                format_rate(c["goodput_rps"]),
                *(
                    (_batch(c["mean_batch_size"]), format_share(c["kv_usage_mean"], 0))
                    if batching
                    else (format_share(c["utilization"], 0),)
                ),
                "/".join(format_count(n) for n in counts),
            )
        )
    columns = (
        ("strategy", "<"),
        ("GPUs", ">"),
        ("rate", ">"),
        ("load", ">"),
        ("hit rate", ">"),
        ("TTFT p50", ">"),
        ("TTFT p99", ">"),
        ("TPOT p99", ">"),
        ("in SLO", ">"),
        ("goodput", ">"),
        *((("batch", ">"), ("KV used", ">")) if batching else (("busy", ">"),)),
        ("done/rej/fail", ">"),
    )
    usage = (
        "batch = requests per step; KV used = time-weighted mean share of KV blocks pinned"
        if batching
        else "busy = share of GPU time serving a request (utilization)"
    )
    notes = [
        "rates and goodput in req/s; times in simulated ms (s where marked); load = offered "
        f"rate / measured capacity (! overloaded); in SLO = SLO attainment; {usage}"
    ]
    overload = overload_summary(result)
    if overload:
        notes.append(overload)
    return Table("Every cell", columns, tuple(rows), tuple(notes), frozenset(marked))


def _batch(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def sweep_tables(result: Mapping[str, Any]) -> list[Table]:
    tables = [sustained_table(result)]
    fewest = fewest_gpus_table(result)
    if fewest is not None:
        tables.append(fewest)
    tables.append(cells_table(result))
    return tables


def format_sweep(result: Mapping[str, Any]) -> str:
    """The recommendation, the settings that matter, then every table, as text."""
    meta = result["meta"]
    slo = meta["slo"]
    lines = [*result["recommendation"], ""]
    lines.append(
        f"model: {engine_label(meta)}; {meta['preset']} "
        f"({format_count(meta['num_blocks'])} blocks); SLO: TTFT ≤ {slo['ttft_ms']:,.0f} ms, "
        f"TPOT ≤ {slo['tpot_ms']:,.1f} ms for ≥ {100 * slo['attainment']:g}% of requests"
    )
    for table in sweep_tables(result):
        lines += ["", f"{table.title}:", table.text()]
    return "\n".join(lines)
