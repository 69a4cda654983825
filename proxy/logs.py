"""Logging set-up shared by the main process and every Hypercorn worker."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT, force=True)
    # httpx logs every request at INFO: that is an access log we do not want from a proxy
    logging.getLogger("httpx").setLevel(logging.WARNING)
