"""Consistent hashing with bounded loads (CHWBL), as KubeAI's `PrefixHash` strategy runs it."""

from __future__ import annotations

import bisect
import hashlib
from typing import ClassVar

from kvqueue.gpu.request import Request
from kvqueue.routing.policies.base import check_param, register_policy
from kvqueue.routing.view import RouterView


def _ring_point(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


@register_policy("chwbl")
class BoundedLoadHashing:
    """KubeAI's ``PrefixHash`` load balancing: consistent hashing with bounded loads on the
    prompt's prefix.

    Rule (substratusai/kubeai@2f32ef49: internal/loadbalancer/balance_chwbl.go
    `chwblGetAddr`, `chwblLoadOK`; group.go `getBestAddr`): every worker has `replicas`
    points on a 64-bit ring, ``hash("<name><i>")``; the request's key hashes to a point;
    walking clockwise from the first ring point at or after it (wrapping), over ring *points*
    (a worker can be checked again) and at most once round the ring, take the first worker
    whose in-flight requests satisfy

        total in flight == 0   or   in_flight(w) ≤ (total in flight + 1) / N × load_factor

    N = all workers, compared as floats: no ceiling, and no +1 on the worker's own load (the
    +1 was removed upstream in ab1d895, "remove +1 to load"). If none qualifies, the first
    point's worker (the key's owner on the ring). In flight = the router's own count
    (`WorkerLoad.requests`), raised at dispatch and lowered when the request ends.

    Key: KubeAI hashes the adapter name plus the first `prefixCharLength` = 100 characters of
    the prompt (chat: of the first user message). Without the text, the key here is the
    chained hash of the first `prefix_blocks` blocks: 100 characters at about 4 per token are
    25 tokens, whose blocks are the first two. A prompt without a full block keys on nothing
    and goes to the least loaded (fewest in flight, first in worker order).

    Defaults (the CRD's kubebuilder defaults, api/k8s/v1/model_types.go L172-208):
    ``meanLoadFactor: 125`` → 1.25, ``replication: 256``, ``prefixCharLength: 100``. Index:
    none — a stateless hash, so `--index` changes nothing it reads.
    """

    needs_ticket: ClassVar[bool] = False

    def __init__(
        self, prefix_blocks: int = 2, load_factor: float = 1.25, replicas: int = 256
    ) -> None:
        check_param(prefix_blocks >= 1, f"prefix_blocks must be >= 1, got {prefix_blocks}")
        check_param(load_factor >= 1.0, f"load_factor must be >= 1, got {load_factor}")
        check_param(replicas >= 1, f"replicas must be >= 1, got {replicas}")
        self.prefix_blocks = prefix_blocks
        self.load_factor = load_factor
        self.replicas = replicas
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def ring(self, workers: tuple[str, ...]) -> tuple[list[int], list[str]]:
        """Sorted ring points and the worker owning each; cached per set of live workers."""
        ring = self._rings.get(workers)
        if ring is None:
            pairs = sorted(
                (_ring_point(f"{w}{i}".encode()), w) for w in workers for i in range(self.replicas)
            )
            ring = ([p for p, _ in pairs], [w for _, w in pairs])
            self._rings[workers] = ring
        return ring

    def load_ok(self, in_flight: int, total: int, num_workers: int) -> bool:
        """KubeAI's `chwblLoadOK`."""
        if total == 0:
            return True
        return in_flight <= (total + 1) / num_workers * self.load_factor

    def key(self, request: Request) -> int:
        depth = min(self.prefix_blocks, request.num_blocks)
        return int.from_bytes(request.block_hashes[depth - 1][:8], "big")

    def choose(self, request: Request, view: RouterView) -> str:
        if request.num_blocks == 0:
            return min(view.workers, key=lambda w: view.load(w).requests)
        points, owners = self.ring(view.workers)
        start = bisect.bisect_left(points, self.key(request)) % len(points)
        total = sum(view.load(w).requests for w in view.workers)
        num_workers = len(view.workers)
        # The bound depends on the worker only, so rechecking a worker's point changes nothing.
        ok = {w for w in view.workers if self.load_ok(view.load(w).requests, total, num_workers)}
        for step in range(len(points)):
            worker = owners[(start + step) % len(points)]
            if worker in ok:
                return worker
        return owners[start]
