"""Model and tokenizer names: a hub name (``name`` or ``owner/name``) or a local path."""

from __future__ import annotations


def looks_like_local_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".json", ".model", ".tiktoken"))
    )
