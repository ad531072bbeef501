"""Redis URLs: passwords never shown, ambiguous URLs refused with a hint, a clear ACL check."""

from __future__ import annotations

import pytest

from kvqueue.errors import ConfigError
from kvqueue.live.connection import RedisUnavailable, check_url, connect, redact, scrub, user_of


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://alice:hunter2@cache:6380/3", "redis://alice:***@cache:6380/3"),
        ("rediss://alice:hunter2@cache:6380/3", "rediss://alice:***@cache:6380/3"),
        ("redis://hunter2@cache/0", "redis://***@cache/0"),
        ("redis://:hun/ter@2@cache:1/0", "redis://:***@cache:1/0"),
        ("redis://cache:1/0?password=hunter2&db=3", "redis://cache:1/0?password=***&db=3"),
        ("unix://:hunter2@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        (
            "unix:///run/redis.sock?db=1&password=hunter2",
            "unix:///run/redis.sock?db=1&password=***",
        ),
    ],
)
def test_redact_hides_the_password_however_it_is_written(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_an_unencoded_slash_in_the_password_is_refused_with_the_fix_and_without_the_secret() -> (
    None
):
    with pytest.raises(ConfigError) as caught:
        check_url("redis://:hun/ter2@127.0.0.1:6379/0")

    assert "percent-encoded (%2F" in str(caught.value)
    assert "ter2" not in str(caught.value) and "hun" not in str(caught.value)
    assert check_url("redis://:hun%2Fter2@127.0.0.1:6379/0")  # encoded, it is fine


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=hunter2"]
)
def test_a_connection_error_names_the_url_without_the_password(url: str) -> None:
    with pytest.raises(RedisUnavailable) as caught:
        connect(url)

    assert "cannot reach Redis at redis://" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_scrub_hides_the_password_wherever_a_message_repeats_it() -> None:
    url = "redis://alice:hunter2@cache:1/0"
    message = f"failed with {url}; auth hunter2 refused"

    assert scrub(message, url) == "failed with redis://alice:***@cache:1/0; auth *** refused"


def test_the_user_is_the_urls_or_redis_default() -> None:
    assert user_of("redis://alice:pw@cache/0") == "alice"
    assert user_of("redis://:pw@cache/0") == "default"
