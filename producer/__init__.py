"""Entry point: `python producer/send.py ...` sends a workload through the live pipeline."""
