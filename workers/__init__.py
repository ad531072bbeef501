"""Entry point for RQ: `rq worker -w workers.KVWorker worker-0` (one per simulated GPU)."""

from kvqueue.live.worker import KVWorker

__all__ = ["KVWorker"]
