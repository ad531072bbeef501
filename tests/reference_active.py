"""The previous `ActiveSequences`, kept as a reference for `test_active_replay`.

It kept, per worker, a reference count per active block (a dict entry for every block of
every unfinished request) and did its Python work block by block on `add` and `free`. The
current class keeps each worker's active chains as a radix tree of runs with one count per
run; the replay test checks that both answer every call alike. The class body is the
previous one verbatim (the class renamed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing.index import leading_run


@dataclass(slots=True)
class _Flight:
    worker: str
    blocks: tuple[BlockHash, ...]
    prefill_tokens: int  # −1 once its first token came


@dataclass(slots=True)
class _WorkerFlights:
    prefill_tokens: int = 0
    prefilling: int = 0  # requests without a first token
    block_refs: dict[BlockHash, int] = field(default_factory=dict)


class ReferenceActiveSequences:
    """Per worker: prompt tokens awaiting prefill and reference-counted active blocks."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        self._workers: dict[str, _WorkerFlights] = {}

    def _worker(self, worker: str) -> _WorkerFlights:
        flights = self._workers.get(worker)
        if flights is None:
            flights = self._workers[worker] = _WorkerFlights()
        return flights

    def add(
        self,
        request_id: str,
        worker: str,
        block_hashes: Sequence[BlockHash],
        prefill_tokens: int,
    ) -> None:
        """A request routed to `worker`; a request id already in flight is replaced."""
        if request_id in self._flights:
            self.free(request_id)
        flights = self._worker(worker)
        blocks = tuple(block_hashes)
        self._flights[request_id] = _Flight(worker, blocks, max(0, prefill_tokens))
        flights.prefill_tokens += max(0, prefill_tokens)
        flights.prefilling += 1
        refs = flights.block_refs
        for block in blocks:
            refs[block] = refs.get(block, 0) + 1

    def prefill_done(self, request_id: str) -> None:
        """Its first token came: its prompt no longer waits (unknown ids are ignored)."""
        flight = self._flights.get(request_id)
        if flight is None or flight.prefill_tokens < 0:
            return
        flights = self._workers[flight.worker]
        flights.prefill_tokens -= flight.prefill_tokens
        flights.prefilling -= 1
        flight.prefill_tokens = -1  # done

    def free(self, request_id: str) -> None:
        """It ended (or was refused): its blocks are released (unknown ids are ignored)."""
        self.prefill_done(request_id)
        flight = self._flights.pop(request_id, None)
        if flight is None:
            return
        refs = self._workers[flight.worker].block_refs
        for block in flight.blocks:
            count = refs[block] - 1
            if count:
                refs[block] = count
            else:
                del refs[block]

    def blocks_of(self, request_id: str) -> tuple[BlockHash, ...]:
        """The chain of a request in flight (empty if unknown)."""
        flight = self._flights.get(request_id)
        return flight.blocks if flight is not None else ()

    def forget(self, worker: str) -> None:
        """Drop every flight of `worker` (it left the cluster)."""
        for request_id in [r for r, f in self._flights.items() if f.worker == worker]:
            del self._flights[request_id]
        self._workers.pop(worker, None)

    def prefill_tokens(self, worker: str) -> int:
        flights = self._workers.get(worker)
        return flights.prefill_tokens if flights is not None else 0

    def prefilling(self, worker: str) -> int:
        """Requests without a first token."""
        flights = self._workers.get(worker)
        return flights.prefilling if flights is not None else 0

    def num_blocks(self, worker: str) -> int:
        flights = self._workers.get(worker)
        return len(flights.block_refs) if flights is not None else 0

    def matched(self, worker: str, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of `block_hashes` already active on `worker`."""
        flights = self._workers.get(worker)
        if flights is None:
            return 0
        return leading_run(block_hashes, flights.block_refs.__contains__)
