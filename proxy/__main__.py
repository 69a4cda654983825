"""`python -m proxy`: validate settings, start the embedded Redis if needed, serve with Hypercorn."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from hypercorn.config import Config
from hypercorn.run import run

from .embedded_redis import RedisBinaryNotFound, RedisProcess
from .logs import configure_from
from .server import GatewayConfig, install
from .settings import Settings, SettingsError, load_settings, mask_secrets
from .strict import HEAD_LIMIT
from .tempdirs import private_tempdir

log = logging.getLogger("proxy")


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn set up for a proxy: explicit header and queue limits, no server headers of its
    own, the strict protocols of proxy/server.py (h2c only with GATEWAY_H2C)."""
    install()
    config = GatewayConfig()
    config.h2c = settings.gateway_h2c
    host = f"[{settings.gateway_host}]" if ":" in settings.gateway_host else settings.gateway_host
    config.bind = [f"{host}:{settings.gateway_port}"]
    config.application_path = "proxy.app:create_app()"
    # one worker runs in this process (workers=0 in Hypercorn's terms); more are spawned
    config.workers = 0 if settings.gateway_workers == 1 else settings.gateway_workers
    config.worker_class = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config.graceful_timeout = settings.shutdown_timeout
    config.keep_alive_timeout = 5
    config.backlog = 1024
    config.h11_max_incomplete_size = HEAD_LIMIT         # request line + headers (StrictConnection)
    config.h2_max_inbound_frame_size = 64 * 1024
    config.max_app_queue_size = 4                       # body chunks (<= 64 KiB) buffered per request
    config.include_server_header = False                # the upstream's Server/Date pass through
    config.include_date_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def main() -> int:
    try:
        settings = load_settings(os.environ, Path(".env"))
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_from(settings)
    embedded: RedisProcess | None = None
    if settings.redis_url is None:
        try:
            embedded = RedisProcess()
            embedded.start()
        except (RedisBinaryNotFound, RuntimeError, OSError) as exc:
            print(f"gateway: REDIS_URL is unset and the embedded redis-server failed: {exc}",
                  file=sys.stderr)
            return 2
        os.environ["REDIS_URL"] = embedded.url                  # every worker shares it
        log.info("REDIS_URL unset: started embedded redis-server pid=%s at %s (no persistence)",
                 embedded.pid, embedded.url)
    # set before any worker imports prometheus_client: one scrape then covers every worker
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = str(private_tempdir("metrics"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        log.info("configuration: %s", describe(settings, os.environ["REDIS_URL"]))
        return run(hypercorn_config(settings))
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.stop()
            log.info("embedded redis-server stopped")


def describe(settings: Settings, redis_url: str) -> str:
    """The effective configuration on one line, secrets masked."""
    values = asdict(settings)
    values["redis_url"] = mask_secrets(redis_url)
    values["upstream_backend_url"] = str(settings.upstream_backend_url)
    values["trusted_proxies"] = ",".join(str(n) for n in settings.trusted_proxies) or "-"
    return " ".join(f"{name.upper()}={value}" for name, value in values.items())


if __name__ == "__main__":
    sys.exit(main())
