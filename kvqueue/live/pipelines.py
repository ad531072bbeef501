"""Pipelines that carry their Lua scripts' text: one round trip, whatever Redis has cached.

redis-py runs a pipeline holding registered scripts (`Script`) in two round trips: SCRIPT
EXISTS for every script first (`Pipeline.load_scripts`), then the pipeline with EVALSHA. The
live pipeline's hot paths — the producer's enqueue with the router's commit, a worker's job
start and its end — each hold a script, so that check was a third of their round trips.

`pipeline(client, transaction)` returns a pipeline that skips the check and sends each
script as EVAL with its text. Redis hashes the text and runs its cached compiled copy, so the
server's work is the same; the text travels on the loopback instead of a round trip. And no
NOSCRIPT can come back: after a Redis restart an EVALSHA inside MULTI/EXEC would fail alone
while the transaction's other commands applied, where EVAL just runs.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline


class InlineScriptsPipeline(Pipeline):
    """A redis-py pipeline whose scripts run as EVAL of their text (module docstring)."""

    def load_scripts(self) -> None:
        """Nothing to check: every script is sent with its text."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        for script in self.scripts:
            if script.sha == sha:
                return self.execute_command("EVAL", script.script, numkeys, *keys_and_args)
        return super().evalsha(sha, numkeys, *keys_and_args)


def pipeline(client: redis.Redis, transaction: bool = True) -> InlineScriptsPipeline:
    """A pipeline on `client`'s connections (see `InlineScriptsPipeline`)."""
    return InlineScriptsPipeline(
        client.connection_pool, client.response_callbacks, transaction, None
    )
