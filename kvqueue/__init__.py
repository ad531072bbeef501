"""kvqueue: a testbed for KV-cache-aware request routing on Redis and RQ."""

from __future__ import annotations

__version__ = "0.1.0"
