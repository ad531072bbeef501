"""The live pipeline on Redis and RQ: producer, KV worker, run streams, local clusters."""
