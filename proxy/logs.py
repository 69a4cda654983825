"""Logging set-up shared by the main process and every Hypercorn worker: text for a terminal,
JSON lines for log shippers (LOG_FORMAT)."""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
access_log = logging.getLogger("proxy.access")


def escape(text: str) -> str:
    """`text` safe inside a quoted log field: control and non-ASCII characters, quotes and
    backslashes as Python escapes (so a CR/LF cannot start a forged line, nor ESC a terminal
    sequence); printable ASCII text is returned as it is."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class TextFormatter(logging.Formatter):
    """The terminal format (UTC times); the text fields of an access record are escaped here,
    when the line is written, so the record and the JSON format keep the real values."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict) or record.args is not fields:
            return super().format(record)
        record.args = {name: escape(value) if isinstance(value, str) else value
                       for name, value in fields.items()}
        try:
            return super().format(record)
        finally:
            record.args = fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access-log records carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(level: str, fmt: str = "text", access: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO: that is an access log we do not want from a proxy
    logging.getLogger("httpx").setLevel(logging.WARNING)
    access_log.setLevel(logging.NOTSET if access else logging.WARNING)


def configure_from(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
