"""Settings: one frozen object built once per process from the environment and `.env`."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal, TypeVar, cast

import httpx

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
SWITCHES = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}
REDIS_SCHEMES = ("redis", "rediss", "unix")
FAIL_MODES = ("open", "closed")

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and the value."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway is configured with; field names are the variables lowercased."""

    gateway_host: str
    gateway_port: int
    gateway_workers: int
    redis_url: str | None
    upstream_backend_url: httpx.URL
    rate_limit: int
    time_window: int
    max_concurrent_requests: int
    queue_timeout: float
    upstream_timeout: float
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    rate_limit_fail_mode: Literal["open", "closed"]
    redis_key_prefix: str
    redis_timeout: float
    max_body_size: int
    shutdown_timeout: float
    log_level: str
    log_format: Literal["text", "json"]
    access_log: bool
    gateway_h2c: bool


def load_settings(environ: Mapping[str, str], dotenv: Path | None = None) -> Settings:
    """Build Settings from `dotenv` overlaid by `environ` (the real environment wins)."""
    raw = {**read_dotenv(dotenv), **environ}
    return Settings(
        gateway_host=_parse(raw, "GATEWAY_HOST", "127.0.0.1", _non_empty),
        gateway_port=_parse(raw, "GATEWAY_PORT", "8000", _port),
        gateway_workers=_parse(raw, "GATEWAY_WORKERS", "1", _positive_int),
        redis_url=_parse(raw, "REDIS_URL", "", _redis_url),
        upstream_backend_url=_parse(raw, "UPSTREAM_BACKEND_URL", "http://127.0.0.1:8001", _upstream),
        rate_limit=_parse(raw, "RATE_LIMIT", "5", _positive_int),
        time_window=_parse(raw, "TIME_WINDOW", "60", _positive_int),
        max_concurrent_requests=_parse(raw, "MAX_CONCURRENT_REQUESTS", "20", _positive_int),
        queue_timeout=_parse(raw, "QUEUE_TIMEOUT", "10", _positive_seconds),
        upstream_timeout=_parse(raw, "UPSTREAM_TIMEOUT", "30", _positive_seconds),
        trusted_proxies=_parse(raw, "TRUSTED_PROXIES", "", _networks),
        rate_limit_fail_mode=_parse(raw, "RATE_LIMIT_FAIL_MODE", "open", _fail_mode),
        redis_key_prefix=_parse(raw, "REDIS_KEY_PREFIX", "rl", _key_prefix),
        redis_timeout=_parse(raw, "REDIS_TIMEOUT", "0.5", _positive_seconds),
        max_body_size=_parse(raw, "MAX_BODY_SIZE", str(1 << 30), _positive_int),
        shutdown_timeout=_parse(raw, "SHUTDOWN_TIMEOUT", "10", _positive_seconds),
        log_level=_parse(raw, "LOG_LEVEL", "INFO", _log_level),
        log_format=_parse(raw, "LOG_FORMAT", "text", _log_format),
        access_log=_parse(raw, "ACCESS_LOG", "on", _switch),
        gateway_h2c=_parse(raw, "GATEWAY_H2C", "off", _switch),
    )


def read_dotenv(path: Path | None) -> dict[str, str]:
    """Parse KEY=VALUE lines (optional `export`, quotes, `#` comments); a missing file is empty."""
    if path is None or not path.is_file():
        return {}
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        if value[:1] in ("'", '"'):
            closing = value.find(value[0], 1)
            rest = value[closing + 1:].strip() if closing > 0 else "?"
            if rest and not rest.startswith("#"):
                raise SettingsError(f"{path}:{number}: unbalanced quotes in {line!r}")
            value = value[1:closing]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _parse(raw: Mapping[str, str], name: str, default: str, parser: Callable[[str], T]) -> T:
    value = raw.get(name, default).strip()
    try:
        return parser(value)
    except ValueError as exc:
        raise SettingsError(f"{name} {exc}, got {mask_secrets(value)!r}") from None


def mask_secrets(url: str) -> str:
    """Hide the password of a URL's userinfo, for messages and logs."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*:).*@", r"\1***@", url, flags=re.I)


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("must be a positive integer") from None
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return number


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError("must be a positive number of seconds")
    return number


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    scheme = value.partition("://")[0].lower()
    if "://" not in value or scheme not in REDIS_SCHEMES:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


def _upstream(value: str) -> httpx.URL:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        raise ValueError("must be an http:// or https:// URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError("must have a port number from 1 to 65535")
    if url.query or url.fragment or url.userinfo:
        raise ValueError("must not carry credentials, a query or a fragment")
    return url.copy_with(raw_path=url.raw_path.rstrip(b"/"))


def _networks(value: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"must be comma-separated IPs or CIDRs ({item!r} is neither)") from None
    return tuple(networks)


def _fail_mode(value: str) -> Literal["open", "closed"]:
    if value.lower() not in FAIL_MODES:
        raise ValueError("must be 'open' or 'closed'")
    return cast(Literal["open", "closed"], value.lower())


def _key_prefix(value: str) -> str:
    if not value or any(c in value for c in "{} \t\r\n"):
        raise ValueError("must be non-empty without braces or white space")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _log_format(value: str) -> Literal["text", "json"]:
    if value.lower() not in LOG_FORMATS:
        raise ValueError("must be 'text' or 'json'")
    return cast(Literal["text", "json"], value.lower())


def _switch(value: str) -> bool:
    try:
        return SWITCHES[value.lower()]
    except KeyError:
        raise ValueError("must be on or off (1/0, true/false, yes/no)") from None
