"""Settings: defaults, validation messages, `.env` handling and immutability."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from proxy.settings import Settings, SettingsError, load_settings, read_dotenv


def test_defaults_without_environment_or_dotenv() -> None:
    s = load_settings({}, None)
    assert s.gateway_host == "127.0.0.1"
    assert s.gateway_port == 8000
    assert s.gateway_workers == 1
    assert s.redis_url is None
    assert s.upstream_backend_url == httpx.URL("http://127.0.0.1:8001")
    assert (s.upstream_backend_url.scheme, s.upstream_backend_url.host,
            s.upstream_backend_url.port) == ("http", "127.0.0.1", 8001)
    assert s.rate_limit == 5
    assert s.time_window == 60
    assert s.max_concurrent_requests == 20
    assert s.queue_timeout == 10
    assert s.upstream_timeout == 30
    assert s.trusted_proxies == ()
    assert s.rate_limit_fail_mode == "open"
    assert s.redis_key_prefix == "rl"
    assert s.log_level == "INFO"
    assert s.gateway_h2c is False


INVALID = [
    # positive integers
    ("RATE_LIMIT", "abc"), ("RATE_LIMIT", "0"), ("RATE_LIMIT", "-3"), ("RATE_LIMIT", "1.5"),
    ("TIME_WINDOW", "soon"), ("TIME_WINDOW", "0"), ("TIME_WINDOW", "-60"),
    ("GATEWAY_WORKERS", "0"), ("GATEWAY_WORKERS", "many"),
    ("MAX_CONCURRENT_REQUESTS", "0"), ("MAX_CONCURRENT_REQUESTS", "-1"),
    ("MAX_BODY_SIZE", "0"),
    # positive, finite seconds
    ("QUEUE_TIMEOUT", "abc"), ("QUEUE_TIMEOUT", "0"), ("QUEUE_TIMEOUT", "-1"),
    ("QUEUE_TIMEOUT", "nan"), ("QUEUE_TIMEOUT", "inf"), ("QUEUE_TIMEOUT", "-inf"),
    ("UPSTREAM_TIMEOUT", "nan"), ("UPSTREAM_TIMEOUT", "inf"), ("UPSTREAM_TIMEOUT", "0"),
    ("UPSTREAM_TIMEOUT", "-0.5"), ("REDIS_TIMEOUT", "NaN"), ("SHUTDOWN_TIMEOUT", "Infinity"),
    # ports
    ("GATEWAY_PORT", "0"), ("GATEWAY_PORT", "70000"), ("GATEWAY_PORT", "-1"),
    ("GATEWAY_PORT", "http"),
    # upstream
    ("UPSTREAM_BACKEND_URL", "ftp://example.com"),
    ("UPSTREAM_BACKEND_URL", "ws://example.com"),
    ("UPSTREAM_BACKEND_URL", "http://"),
    ("UPSTREAM_BACKEND_URL", "http://example.com/?a=1"),
    ("UPSTREAM_BACKEND_URL", "http://example.com/path?debug"),
    ("UPSTREAM_BACKEND_URL", "http://example.com/#frag"),
    ("UPSTREAM_BACKEND_URL", "http://user@example.com"),
    ("UPSTREAM_BACKEND_URL", "http://example.com:70000"),
    # trusted proxies
    ("TRUSTED_PROXIES", "10.0.0.0/33"), ("TRUSTED_PROXIES", "not-an-ip"),
    ("TRUSTED_PROXIES", "10.0.0.1, bogus"),
    # enums
    ("RATE_LIMIT_FAIL_MODE", "sometimes"), ("LOG_LEVEL", "verbose"), ("LOG_LEVEL", "TRACE"),
    ("GATEWAY_H2C", "maybe"), ("GATEWAY_H2C", "h2"),
    # redis
    ("REDIS_URL", "http://localhost:6379"), ("REDIS_URL", "localhost:6379"),
    ("REDIS_KEY_PREFIX", "{rl}"), ("REDIS_KEY_PREFIX", "r l"),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_invalid_value_raises_settings_error_naming_variable_and_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: value}, None)
    message = str(info.value)
    assert message.startswith(name + " "), message
    assert value in message, message


@pytest.mark.parametrize("name", ["REDIS_URL", "UPSTREAM_BACKEND_URL"])
def test_password_in_rejected_url_is_masked_in_message(name: str) -> None:
    value = "ftp://user:s3cret-pw@example.com:6379/0"
    with pytest.raises(SettingsError) as info:
        load_settings({name: value}, None)
    message = str(info.value)
    assert message.startswith(name + " ")
    assert "s3cret-pw" not in message
    assert "***" in message
    assert "user:***@example.com" in message


def test_redis_url_with_http_scheme_and_password_is_masked() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"REDIS_URL": "http://:hunter2@localhost:6379"}, None)
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize("value", ["redis://localhost:6379/0", "rediss://h:6380",
                                   "unix:///tmp/redis.sock", "redis://:pw@h:1/2"])
def test_valid_redis_urls_are_kept(value: str) -> None:
    assert load_settings({"REDIS_URL": value}, None).redis_url == value


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_redis_url_means_none(value: str) -> None:
    assert load_settings({"REDIS_URL": value}, None).redis_url is None


@pytest.mark.parametrize(("value", "expected"), [("on", True), ("1", True), ("YES", True),
                                               ("off", False), ("0", False), ("false", False)])
def test_gateway_h2c_is_an_on_off_switch(value: str, expected: bool) -> None:
    assert load_settings({"GATEWAY_H2C": value}, None).gateway_h2c is expected


def test_fractional_seconds_allowed_for_timeouts() -> None:
    s = load_settings({"QUEUE_TIMEOUT": "0.25", "UPSTREAM_TIMEOUT": "2.5"}, None)
    assert s.queue_timeout == 0.25
    assert s.upstream_timeout == 2.5


def test_upstream_base_path_trailing_slash_stripped() -> None:
    url = load_settings({"UPSTREAM_BACKEND_URL": "http://up.example:9000/api/"}, None).upstream_backend_url
    assert url.raw_path == b"/api"
    assert str(url) == "http://up.example:9000/api"


def test_trusted_proxies_parsed_into_networks() -> None:
    s = load_settings({"TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1 ,2001:db8::/32,"}, None)
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32"]


def test_enum_values_are_case_insensitive() -> None:
    s = load_settings({"RATE_LIMIT_FAIL_MODE": "CLOSED", "LOG_LEVEL": "debug"}, None)
    assert s.rate_limit_fail_mode == "closed"
    assert s.log_level == "DEBUG"


def test_dotenv_is_read_with_export_quotes_and_comments(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment line\n"
        "\n"
        "export RATE_LIMIT=7\n"
        "TIME_WINDOW = \"30\"\n"
        "LOG_LEVEL='warning'\n"
        "GATEWAY_HOST=0.0.0.0 # trailing comment\n"
        "QUOTED_HASH=\"gw # not a comment\"\n"
        "UNSPACED_HASH=a#b\n"
        "export   SPACED_EXPORT = 'x y'\n",
        encoding="utf-8")
    raw = read_dotenv(dotenv)
    assert raw["QUOTED_HASH"] == "gw # not a comment"
    assert raw["UNSPACED_HASH"] == "a#b"
    assert raw["SPACED_EXPORT"] == "x y"
    s = load_settings({}, dotenv)
    assert s.rate_limit == 7
    assert s.time_window == 30
    assert s.log_level == "WARNING"
    assert s.gateway_host == "0.0.0.0"


def test_dotenv_quoted_value_followed_by_comment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text('RATE_LIMIT="9"  # requests per window\n', encoding="utf-8")
    assert load_settings({}, dotenv).rate_limit == 9


def test_real_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("RATE_LIMIT=7\nTIME_WINDOW=30\n", encoding="utf-8")
    s = load_settings({"RATE_LIMIT": "11"}, dotenv)
    assert s.rate_limit == 11
    assert s.time_window == 30


def test_missing_dotenv_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings({}, tmp_path / "absent.env") == load_settings({}, None)


@pytest.mark.parametrize("bad_line", ["THIS IS NOT AN ASSIGNMENT", "1BAD=x", "=value",
                                      "export", 'RATE_LIMIT="7', "RATE_LIMIT='7\" x",
                                      'RATE_LIMIT="7" trailing'])
def test_malformed_dotenv_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# header\nRATE_LIMIT=3\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        load_settings({}, dotenv)
    assert f"{dotenv}:3" in str(info.value)


def test_invalid_value_from_dotenv_names_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("TIME_WINDOW=forever\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"^TIME_WINDOW .*'forever'"):
        load_settings({}, dotenv)


def test_settings_is_frozen() -> None:
    s = load_settings({}, None)
    assert isinstance(s, Settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rate_limit = 1000  # type: ignore[misc]
    assert s.rate_limit == 5
