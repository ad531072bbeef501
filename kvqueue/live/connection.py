"""Redis connections from a URL (`redis://`, `rediss://`, `unix://`, password in the URL)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis

from kvqueue.errors import KVQueueError


class RedisUnavailable(KVQueueError, ConnectionError):
    """Redis did not answer at the configured URL (the message shows it, password redacted)."""


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, check: bool = True) -> redis.Redis:
    """A client for `url`; with `check`, PING it and raise `RedisUnavailable` if it is down."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as exc:
        raise RedisUnavailable(f"invalid REDIS_URL {redact(url)!r}: {exc}") from None
    if check:
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from None
        except redis.AuthenticationError as exc:
            raise RedisUnavailable(f"Redis at {redact(url)} refused the password: {exc}") from None
    return client
