"""RQ job functions that run inside a live KV worker process, for the end-to-end tests.

`cache_snapshot` is enqueued on a worker's own queue like any request, so it runs in the
`KVWorker` process after every request queued before it, and reads that process's real
`BlockCache`: no Redis state is involved in the answer. Imported by the worker subprocesses
(the tests put this directory on their PYTHONPATH), never by kvqueue itself.
"""

from __future__ import annotations

import os
from typing import Any


def cache_snapshot() -> dict[str, Any]:
    """The hashes (hex) this worker process caches right now, and its eviction count."""
    from kvqueue.live import worker

    runtime = worker._RUNTIME
    if runtime is None or runtime.pid != os.getpid():
        raise RuntimeError("cache_snapshot must run inside a KV worker process")
    cache = runtime.gpu.cache
    return {
        "worker": runtime.name,
        "pid": runtime.pid,
        "capacity_blocks": cache.num_blocks,
        "num_evictions": cache.stats.num_evictions,
        "cached": sorted(block_hash.hex() for block_hash in cache.cached_hashes()),
    }
