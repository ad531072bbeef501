"""Every Redis key kvqueue uses, built here and nowhere else: ``<prefix><kind>[:<id>]``.

| key                            | type   | holds                                               |
|--------------------------------|--------|-----------------------------------------------------|
| kvq:n:<32 raw hash bytes>      | hash   | prefix-tree node: `<slot>` = 1 for each worker slot |
|                                |        | that caches the block, `p<pending slot>` = pending- |
|                                |        | until (ms epoch) for each worker that has it        |
|                                |        | pending; binary key: `kvqueue inspect` decodes it   |
| kvq:slots                      | hash   | worker -> its current slot                          |
| kvq:slots:pending              | hash   | worker -> its current pending slot                  |
| kvq:slots:blocks               | hash   | slot -> blocks stored under it                      |
| kvq:slots:next                 | string | the last slot handed out, stored or pending (slots  |
|                                |        | are never reused)                                   |
| kvq:slots:cursor               | string | the sweep's SCAN cursor ('0' between passes)        |
| kvq:slots:dead                 | set    | retired slots' fields (`<slot>`, `p<pending slot>`) |
|                                |        | awaiting a sweep from the nodes                     |
| kvq:slots:sweeping             | set    | retired slots' fields the current sweep pass removes|
| kvq:worker:<worker>:routed     | zset   | approximate index: hashes routed to the worker,     |
|                                |        | score = recency (ms since `kvq:routed:clock` epoch) |
| kvq:routed                     | zset   | approximate index over all workers (`<w>|<hash>`),  |
|                                |        | for caps on the whole tree                          |
| kvq:routed:clock               | hash   | `epoch` (server ms) and `sweep` (next size sweep)   |
| kvq:workers                    | zset   | live workers, score = last heartbeat (server ms)    |
| kvq:worker:<worker>:info       | hash   | a worker's preset, capacity and cache occupancy     |
| kvq:worker:<worker>:generation | string | registrations of the name so far: the current       |
|                                |        | process's generation                                |
| kvq:worker:<worker>:jobs       | hash   | job id -> JSON load record of each outstanding      |
|                                |        | request routed to the worker (queued or in service) |
| kvq:load                       | hash   | outstanding requests per worker                     |
| kvq:load:tokens                | hash   | outstanding prompt+output tokens per worker         |
| kvq:load:work                  | hash   | router's estimate of outstanding service ms/worker  |
| kvq:load:since                 | hash   | wall ms at which the worker's current request began |
| kvq:usage                      | hash   | cache blocks in use per worker (last report)        |
| kvq:capacity                   | hash   | cache capacity in blocks per worker                 |
| kvq:signals                    | hash   | worker -> JSON of its engine's load signals (a      |
|                                |        | batched worker's running, waiting, KV usage, queued |
|                                |        | prefill tokens; `gpu.load_signals.LoadSignals`)     |
| kvq:stats:output               | hash   | `output_tokens`, `completed`: for the mean output;  |
|                                |        | `routed`, `declared`: requests giving max_tokens    |
| kvq:rr                         | string | round-robin counter shared by every producer        |
| kvq:events                     | stream | cache events, one entry per event                   |
| kvq:results:<run id>           | stream | request results of one run (one per request)        |
| kvq:run:<run id>               | hash   | a run's metadata (strategy, workload, counts)       |
| kvq:run:<run id>:reported      | set    | request ids that have their result: the first wins  |
| kvq:run:<run id>:engine        | list   | what the workers' engines did in the run: JSON      |
|                                |        | parts of each worker's `EngineStats`, in order      |
| worker-<i> (RQ)                | list   | the RQ queue of worker i (`rq:queue:worker-<i>`)    |
"""

from __future__ import annotations

DEFAULT_PREFIX = "kvq:"


def node(block_hash: bytes, prefix: str = DEFAULT_PREFIX) -> bytes:
    """A block's node: the prefix, ``n:``, then the raw hash (32 bytes, not hex)."""
    return node_prefix(prefix) + block_hash


def node_prefix(prefix: str = DEFAULT_PREFIX) -> bytes:
    return f"{prefix}n:".encode()


def node_pattern(prefix: str = DEFAULT_PREFIX) -> bytes:
    """SCAN's MATCH for every node key (glob characters in the prefix escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return f"{escaped}n:*".encode()


def slots(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots"


def slot_blocks(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:blocks"


def slots_next(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:next"


def slots_cursor(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:cursor"


def slots_dead(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:dead"


def slots_sweeping(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:sweeping"


def slots_pending(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}slots:pending"


def worker_info(worker: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}worker:{worker}:info"


def worker_generation(worker: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}worker:{worker}:generation"


def worker_jobs(worker: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}worker:{worker}:jobs"


def worker_routed(worker: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}worker:{worker}:routed"


def routed(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}routed"


def routed_clock(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}routed:clock"


def workers(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}workers"


def load(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}load"


def load_tokens(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}load:tokens"


def load_work(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}load:work"


def load_since(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}load:since"


def usage(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}usage"


def capacity(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}capacity"


def engine_signals(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}signals"


def output_stats(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}stats:output"


def round_robin(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}rr"


def events(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}events"


def results(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}results:{run_id}"


def run(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}run:{run_id}"


def run_reported(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}run:{run_id}:reported"


def run_engine(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}run:{run_id}:engine"


def pending_field(slot: str) -> str:
    """A pending mark's field in a node: ``p`` and the worker's pending slot."""
    return f"p{slot}"


def queue_name(worker: str) -> str:
    """RQ queue of a worker: the worker's own name (``worker-0``)."""
    return worker


def worker_name(index: int) -> str:
    return f"worker-{index}"
