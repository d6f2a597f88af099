"""Logging set-up; only main() calls it. Modules use logging.getLogger(__name__)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# Lines about a job say `runner=R job=J attempt=N commit=C` (and repo=, branch=);
# the JSON format lifts these into fields a log shipper can index.
_IDS = re.compile(r"\b(runner|job|attempt|commit|repo|branch)=([^\s,:;]+)")
# Fields every line of this process carries (say, the runner's id).
_CONTEXT: dict[str, str] = {}


def set_context(**fields: str) -> None:
    """Name this process in every JSON line from now on (worker, runner id)."""
    _CONTEXT.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            **_CONTEXT,
        }
        for key, value in _IDS.findall(message):
            data.setdefault(key, value)
        data["message"] = message
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure(level: str = "INFO", fmt: str = "plain", prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every connection failure with a traceback; the broker module
    # already turns each into one line of ours.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    logging.getLogger("git").setLevel(logging.WARNING)
