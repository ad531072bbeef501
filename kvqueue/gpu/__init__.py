"""The simulated GPU: hashing, block cache, events, latency, presets, oracle, engine. No I/O:
nothing here imports redis or rq."""
