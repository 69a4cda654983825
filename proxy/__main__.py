"""`python -m proxy`: validate settings, start the embedded Redis if needed, serve with Hypercorn."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from hypercorn.config import Config
from hypercorn.run import run

from .embedded_redis import RedisBinaryNotFound, RedisProcess
from .logs import configure_logging
from .settings import Settings, SettingsError, load_settings, mask_secrets

log = logging.getLogger("proxy")


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn set up for a proxy: explicit header and queue limits, no server headers of its own."""
    config = Config()
    host = f"[{settings.gateway_host}]" if ":" in settings.gateway_host else settings.gateway_host
    config.bind = [f"{host}:{settings.gateway_port}"]
    config.application_path = "proxy.app:create_app()"
    # one worker runs in this process (workers=0 in Hypercorn's terms); more are spawned
    config.workers = 0 if settings.gateway_workers == 1 else settings.gateway_workers
    config.worker_class = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config.graceful_timeout = settings.shutdown_timeout
    config.keep_alive_timeout = 5
    config.backlog = 1024
    config.h11_max_incomplete_size = 32 * 1024         # request line + headers
    config.h2_max_inbound_frame_size = 64 * 1024
    config.max_app_queue_size = 10                      # body chunks buffered per request
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
    configure_logging(settings.log_level)
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
    try:
        log.info("gateway on http://%s:%d -> %s, %d worker(s), limit %d per %d s, redis %s",
                 settings.gateway_host, settings.gateway_port, settings.upstream_backend_url,
                 settings.gateway_workers, settings.rate_limit, settings.time_window,
                 mask_secrets(os.environ["REDIS_URL"]))
        return run(hypercorn_config(settings))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded redis-server stopped")


if __name__ == "__main__":
    sys.exit(main())
