"""What a router knows of the requests it has in flight on each worker, from its own records.

Dynamo's KV router keeps, per worker, the prompt tokens still to prefill and the *unique*
blocks of the requests it routed there and that have not finished (its "active sequences":
ai-dynamo/dynamo@db19bd2a:lib/llm/src/kv_router/scheduler.rs and the `ActiveSequences` of
`lib/kv-router/src/sequence.rs`, `potential_blocks_and_tokens`): a request adds its uncached
prompt tokens (``isl − overlap × block_size`` as predicted when it was routed) and its full
prompt blocks (reference-counted, so a prefix shared by several requests counts once); its
first token removes the tokens (`mark_prefill_completed`), its end the blocks (`free`).
Output blocks are not tracked (``router_track_output_blocks = false`` by default).

Each worker's active chains are a radix tree of runs (`kvqueue.routing.run_tree`) whose
`value` is the number of unfinished requests whose chain covers the run: a request's chain
adds one to each run along it (splitting at most one run, adding at most one leaf), its end
takes one away and drops the runs left at 0. A prefix shared by several requests is one run
counted once, so ``num_blocks`` is the blocks the tree holds, and the leading run of a chain
among the active blocks is a walk down the tree. Work per call is per run of the chain,
never per block; memory is the distinct blocks of the unfinished requests, one tuple slot
each, plus a node per run.

Invariant: ``prefill_tokens(w)`` is the sum over w's requests without a first token of their
predicted tokens; ``num_blocks(w)`` the number of distinct blocks of w's unfinished requests;
in w's tree a node's value is the requests ending at it plus its children's values, no node
has value 0, and no node has a single child of its own value where no request ends (runs
stay maximal).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kvqueue.gpu.hashing import BlockHash
from kvqueue.routing.run_tree import RunNode, extend, merge_into_child, mergeable, walk


@dataclass(slots=True)
class _Flight:
    worker: str
    blocks: tuple[BlockHash, ...]
    prefill_tokens: int  # −1 once its first token came
    end: RunNode  # the node its chain ends at in its worker's tree (the root if empty)


@dataclass(slots=True)
class _WorkerFlights:
    prefill_tokens: int = 0
    prefilling: int = 0  # requests without a first token
    num_blocks: int = 0  # blocks the tree holds
    tree: RunNode = field(default_factory=RunNode)


class ActiveSequences:
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
        root = flights.tree
        walked = walk(root, blocks)
        flights.num_blocks += len(blocks) - walked.matched
        path = extend(walked, root, blocks, 0)
        for node in path:
            node.value += 1
        end = path[-1] if path else root
        end.ends += 1
        self._flights[request_id] = _Flight(worker, blocks, max(0, prefill_tokens), end)
        flights.prefill_tokens += max(0, prefill_tokens)
        flights.prefilling += 1

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
        flights = self._workers[flight.worker]
        node = flight.end
        node.ends -= 1
        while node.parent is not None:  # up to the root, which holds no blocks
            parent = node.parent
            node.value -= 1
            if node.value == 0:
                del parent.children[node.run[0]]
                flights.num_blocks -= len(node.run)
            elif mergeable(node):
                merge_into_child(node)
            node = parent

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
        return flights.num_blocks if flights is not None else 0

    def matched(self, worker: str, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of `block_hashes` already active on `worker`."""
        flights = self._workers.get(worker)
        if flights is None:
            return 0
        return walk(flights.tree, block_hashes).matched


class ActiveMatches(Mapping[str, int]):
    """``{worker: active.matched(worker, block_hashes)}`` over `workers`, each walked on
    first read: a policy that never reads a worker's active match costs no walk."""

    __slots__ = ("_active", "_block_hashes", "_found", "_workers")

    def __init__(
        self, active: ActiveSequences, workers: Sequence[str], block_hashes: Sequence[BlockHash]
    ) -> None:
        self._active = active
        self._workers = workers
        self._block_hashes = block_hashes
        self._found: dict[str, int] = {}

    def __getitem__(self, worker: str) -> int:
        found = self._found.get(worker)
        if found is None:
            if worker not in self._workers:
                raise KeyError(worker)
            found = self._found[worker] = self._active.matched(worker, self._block_hashes)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._workers)

    def __len__(self) -> int:
        return len(self._workers)
