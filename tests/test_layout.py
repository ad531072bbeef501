"""The package layout's contract: the simulated GPU has no I/O, and the entry points resolve."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import kvqueue.gpu


def test_the_simulated_gpu_imports_neither_redis_nor_rq() -> None:
    modules = [f"kvqueue.gpu.{m.name}" for m in pkgutil.iter_modules(kvqueue.gpu.__path__)]
    assert "kvqueue.gpu.cache" in modules and "kvqueue.gpu.simulated_gpu" in modules
    probe = "; ".join(
        [*(f"import {m}" for m in modules), "import sys", "print(sorted(m for m in sys.modules "
         "if m.split('.')[0] in ('redis', 'rq')))"]
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_kv_worker_class_and_job_function_resolve_from_their_documented_paths() -> None:
    from rq import SimpleWorker
    from rq.utils import import_attribute

    from kvqueue.live.worker import JOB_FUNCTION
    from workers import KVWorker

    assert issubclass(KVWorker, SimpleWorker)
    assert JOB_FUNCTION == "kvqueue.live.worker.serve_request"
    assert callable(import_attribute(JOB_FUNCTION))
