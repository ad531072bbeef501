"""Workloads: synthetic generators, trace readers, arrival processes, tokenizer, CLI options."""
