"""Redis connections from a URL (`redis://`, `rediss://`, `unix://`, password in the URL).

Secrets never reach output: every message shows a URL through `redact`, which hides the
password however it is given (``:pw@``, ``?password=``) and whatever it contains. A password
with an unencoded ``/``, ``?``, ``#`` or ``@`` makes the URL ambiguous (the host seems to start
inside it), so `check_url` refuses it with a hint instead of letting a parser print a piece of
it. `check_access` asks Redis, before anything is written, whether the user may run what
kvqueue runs (Lua scripts on its keys and RQ's).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import redis

from kvqueue import keys
from kvqueue.errors import AccessDeniedError, ConfigError, KVQueueError

_QUERY_SECRET = re.compile(r"(?i)(^|[?&])(password|pass|pwd)=[^&#]*")
_AUTHORITY_END = re.compile(r"[/?#]")


class RedisUnavailable(KVQueueError, ConnectionError):
    """Redis did not answer at the configured URL (the message shows it, password redacted)."""


def redact(url: str) -> str:
    """The URL with its password (in the userinfo or a `password=` query) replaced by ***.

    The userinfo is everything between ``://`` and the last ``@``, so a password holding
    unencoded ``/``, ``?`` or ``@`` is hidden whole as well.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url or "password" in url.lower() else url
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, _ = userinfo.partition(":")
        rest = (f"{user}:***@" if colon else "***@") + rest
    head, query_sep, query = rest.partition("?")
    if query_sep:
        query = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}=***", query)
    return f"{scheme}://{head}{query_sep}{query}"


def scrub(text: str, url: str) -> str:
    """`text` (an error message) with the URL's password, wherever it appears, hidden."""
    _, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if sep and at >= 0:
        _, colon, password = rest[:at].partition(":")
        if colon and password:
            text = text.replace(password, "***")
    for match in _QUERY_SECRET.finditer(url.partition("?")[2]):
        secret = match.group(0).partition("=")[2]
        if secret:
            text = text.replace(secret, "***")
    return text.replace(url, redact(url))


def check_url(url: str) -> str:
    """`url` if it parses unambiguously; else `ConfigError` naming it (redacted)."""
    _, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"REDIS_URL {redact(url)!r} has no scheme: use redis://, rediss:// or unix://"
        )
    end = _AUTHORITY_END.search(rest)
    if end is not None and "@" in rest[end.start() :]:
        raise ConfigError(
            f"REDIS_URL {redact(url)!r} has an '@' after its host part: the password holds "
            "'/', '?', '#' or '@', which must be percent-encoded (%2F, %3F, %23, %40)"
        )
    return url


def user_of(url: str) -> str:
    """The Redis user a URL logs in as (`default` when it names none)."""
    try:
        return urlsplit(url).username or "default"
    except ValueError:
        return "default"


def connect(url: str, check: bool = True) -> redis.Redis:
    """A client for `url`; with `check`, PING it and raise `RedisUnavailable` if it is down."""
    check_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as exc:
        message = scrub(str(exc), url)
        raise RedisUnavailable(f"invalid REDIS_URL {redact(url)!r}: {message}") from None
    if check:
        try:
            client.ping()
        except redis.AuthenticationError as exc:
            message = scrub(str(exc), url)
            raise RedisUnavailable(
                f"Redis at {redact(url)} refused the password: {message}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            message = scrub(str(exc), url)
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {message}") from None
    return client


# Runs nothing and touches nothing: Redis checks the command and the declared keys against
# the user's ACL before it runs a script, so a refusal here means a refusal later.
_ACCESS_PROBE = "return 1"


def check_access(client: redis.Redis, url: str, prefix: str = keys.DEFAULT_PREFIX) -> None:
    """Raise `AccessDeniedError` (one line) if the user may not run Lua scripts on kvqueue's
    keys and RQ's. Writes nothing."""
    probe_keys = [keys.workers(prefix), "rq:queue:kvqueue-access-probe", "rq:job:probe"]
    try:
        client.eval(_ACCESS_PROBE, len(probe_keys), *probe_keys)
    except redis.exceptions.NoPermissionError as exc:
        raise AccessDeniedError(
            f"Redis user {user_of(url)!r} at {redact(url)} may not do what kvqueue needs "
            f"({exc}); grant the rights in docs/reliability.md (ACL)"
        ) from None
