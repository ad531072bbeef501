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


# Touches nothing. Redis checks EVAL and its declared keys against the user's ACL before it
# runs a script; inside, `redis.acl_check_cmd` (Redis >= 7) asks whether the user could run
# each command kvqueue's scripts and RQ run, on keys like theirs, without running it.
_ACCESS_PROBE = """
-- KEYS[1] = a kvqueue key, KEYS[2] = an RQ queue, KEYS[3] = an RQ job
if not redis.acl_check_cmd then return {} end
local needed = {
  {'TIME'}, {'GET', KEYS[1]}, {'INCR', KEYS[1]}, {'DEL', KEYS[1]}, {'EXISTS', KEYS[1]},
  {'PEXPIRE', KEYS[1], '1'}, {'PEXPIREAT', KEYS[1], '1'}, {'PERSIST', KEYS[1]},
  {'HSET', KEYS[1], 'f', 'v'}, {'HSETNX', KEYS[1], 'f', 'v'}, {'HGETALL', KEYS[1]},
  {'HINCRBY', KEYS[1], 'f', '1'}, {'HINCRBYFLOAT', KEYS[1], 'f', '1'}, {'HDEL', KEYS[1], 'f'},
  {'SADD', KEYS[1], 'm'}, {'SMEMBERS', KEYS[1]}, {'SISMEMBER', KEYS[1], 'm'},
  {'SCAN', '0'}, {'SUNIONSTORE', KEYS[1], KEYS[1]}, {'ZADD', KEYS[1], '1', 'm'},
  {'ZRANGEBYSCORE', KEYS[1], '0', '1'}, {'XADD', KEYS[1], '*', 'f', 'v'},
  {'XRANGE', KEYS[1], '-', '+'}, {'RPUSH', KEYS[2], 'v'}, {'LREM', KEYS[2], '1', 'v'},
  {'HSET', KEYS[3], 'f', 'v'},
}
local denied = {}
for _, command in ipairs(needed) do
  if not redis.acl_check_cmd(unpack(command)) then denied[#denied + 1] = command[1] end
end
return denied
"""


def check_access(client: redis.Redis, url: str, prefix: str = keys.DEFAULT_PREFIX) -> None:
    """Raise `AccessDeniedError` (one line) if the user may not run what kvqueue and RQ run
    on their keys: Lua scripts, and the commands in them. Writes nothing."""
    probe_keys = [keys.workers(prefix), "rq:queue:kvqueue-access-probe", "rq:job:kvqueue-probe"]
    who = f"Redis user {user_of(url)!r} at {redact(url)}"
    try:
        denied = client.eval(_ACCESS_PROBE, len(probe_keys), *probe_keys)
    except redis.exceptions.NoPermissionError as exc:
        raise AccessDeniedError(
            f"{who} may not run kvqueue's Lua scripts ({exc}); grant the rights in "
            "docs/reliability.md (ACL)"
        ) from None
    if denied:
        names = ", ".join(sorted({d.decode() if isinstance(d, bytes) else str(d) for d in denied}))
        raise AccessDeniedError(
            f"{who} may not run {names} on kvqueue's keys ({prefix}*, rq:*); grant the "
            "rights in docs/reliability.md (ACL)"
        )
