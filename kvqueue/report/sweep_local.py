"""Sweep cells in local processes: forked children that inherit the workload, or serially.

Children are forked after the requests are built, so nothing but a `Cell` goes in and a cell
record comes out. Where fork is unavailable, or with one job, cells run in this process.
Cells share nothing, so the records are identical however many processes run them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from kvqueue.gpu.oracle import DecodeLengthOracle
from kvqueue.gpu.request import Request
from kvqueue.report.sweep_cell import measure_cell
from kvqueue.report.sweep_spec import Cell, SweepSpec

CellProgress = Callable[[int], None]

# Inherited by forked children; set only while `LocalCells.run` runs a pool.
_FORK_STATE: tuple[SweepSpec, Sequence[Request], DecodeLengthOracle | None] | None = None


def _measure_in_child(cell: Cell) -> dict[str, Any]:
    assert _FORK_STATE is not None, "runs only in a child forked by LocalCells.run"
    spec, requests, oracle = _FORK_STATE
    return measure_cell(spec, cell, requests, oracle)


class LocalCells:
    """Runs cells of one sweep in up to `jobs` forked processes."""

    def __init__(
        self,
        spec: SweepSpec,
        requests: Sequence[Request],
        jobs: int = 1,
        oracle: DecodeLengthOracle | None = None,
    ) -> None:
        self.spec = spec
        self.requests = requests
        self.jobs = max(1, jobs)
        self.oracle = oracle

    def describe(self) -> str:
        return f"local, {self.jobs} process{'es' if self.jobs > 1 else ''}"

    def run(
        self, cells: Sequence[Cell], progress: CellProgress | None = None
    ) -> list[dict[str, Any]]:
        """The record of every cell, in the order given."""
        forkable = "fork" in multiprocessing.get_all_start_methods()
        if self.jobs <= 1 or len(cells) <= 1 or not forkable:
            records = []
            for cell in cells:
                records.append(measure_cell(self.spec, cell, self.requests, self.oracle))
                if progress is not None:
                    progress(1)
            return records
        return self._run_forked(cells, progress)

    def _run_forked(
        self, cells: Sequence[Cell], progress: CellProgress | None
    ) -> list[dict[str, Any]]:
        global _FORK_STATE
        _FORK_STATE = (self.spec, self.requests, self.oracle)
        context = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(
                max_workers=min(self.jobs, len(cells)), mp_context=context
            ) as pool:
                futures = [pool.submit(_measure_in_child, cell) for cell in cells]
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            pool.shutdown(cancel_futures=True)
                            raise future.exception()  # type: ignore[misc]
                        if progress is not None:
                            progress(1)
                return [future.result() for future in futures]
        finally:
            _FORK_STATE = None
