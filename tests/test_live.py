"""Warnings a live run gives before it sends anything."""

from __future__ import annotations

from kvqueue import keys
from kvqueue.config import Settings
from kvqueue.live.run import fit_warning


def register_info(client, worker: str, capacity: int, context: int) -> None:
    client.hset(
        keys.worker_info(worker),
        mapping={"preset": "llama-2-13b@a100-40gb", "capacity_blocks": capacity,
                 "max_context_tokens": context},
    )  # fmt: skip


def test_requests_the_workers_can_never_serve_are_named_before_sending(
    fake_redis, make_request
) -> None:
    register_info(fake_redis, "worker-0", capacity=924, context=4096)
    register_info(fake_redis, "worker-1", capacity=924, context=4096)
    requests = [
        make_request(1000, max_tokens=10, request_id="fits"),
        make_request(5000, max_tokens=10, request_id="too-long"),
    ]

    warning = fit_warning(fake_redis, Settings(), requests, ["worker-0", "worker-1"])

    assert warning is not None
    assert warning.startswith("1 of 2 requests cannot fit llama-2-13b@a100-40gb")
    assert "too-long" in warning and "4,096-token context" in warning


def test_no_warning_when_every_request_fits(fake_redis, make_request) -> None:
    register_info(fake_redis, "worker-0", capacity=924, context=4096)
    requests = [make_request(1000, max_tokens=10, request_id="fits")]

    assert fit_warning(fake_redis, Settings(), requests, ["worker-0"]) is None
