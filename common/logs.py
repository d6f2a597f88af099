"""Logging set-up; only main() calls it. Modules use logging.getLogger(__name__).

A line about a job or a runner names its ids twice: in the message for people
(`job=%s`), and as fields for log shippers, through `extra=ids(...)`:

    log.info("job=%s commit=%s queued", job_id, sha[:12], extra=ids(job=job_id, commit=sha))

The JSON format turns those fields into keys of its object; the plain format
shows only the message. Both escape control characters in every value, so a
branch name with a newline or a commit message with terminal escapes cannot
forge a line, nor a field.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from common.settings import redact_url

# The fields ids() accepts: the JSON keys a shipper can index.
ID_FIELDS = ("worker", "runner", "job", "attempt", "commit", "repo", "branch")
# The record attribute ids() fills; one attribute, so no id can clash with
# LogRecord's own (name, message, ...).
_IDS_ATTR = "volt_ids"
# Fields every line of this process carries (say, the runner's id).
_CONTEXT: dict[str, Any] = {}

# C0 and C1 controls, DEL, the Unicode line and paragraph separators (some
# viewers break lines there), and lone surrogates (they cannot be written as UTF-8).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(found: re.Match[str]) -> str:
    char = found.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """The text on one line: control characters as `\\n`, `\\x1b`, `\\u2028` escapes."""
    return _CONTROL.sub(_escape_one, text)


def ids(**fields: object) -> dict[str, Any]:
    """The `extra=` of a log call whose line is about these ids (see ID_FIELDS), e.g.
    `extra=ids(job=job_id, attempt=2, commit=sha)`. A repo URL's password is hidden."""
    unknown = set(fields) - set(ID_FIELDS)
    if unknown:
        raise TypeError(f"not a log id field: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key == "repo":
            value = redact_url(str(value))
        values[key] = value if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return {_IDS_ATTR: values}


def set_context(**fields: str) -> None:
    """Name this process in every JSON line from now on (worker, runner id)."""
    _CONTEXT.update(fields)


def _ids_of(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, _IDS_ATTR, None)
    return found if isinstance(found, dict) else {}


def _indented(text: str) -> str:
    """A traceback under its line: every line indented, so none of them (an
    exception's message holds values too) can pass for a line of its own."""
    return "\n".join("    " + escape(line) for line in text.splitlines())


class PlainFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line per record (tracebacks indented under it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        raw = record.message
        record.message = escape(raw)
        try:
            return super().formatMessage(record)
        finally:
            record.message = raw

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(stack_info)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the process's context, the
    call's ids, and the message."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            **_CONTEXT,
        }
        for key, value in _ids_of(record).items():
            data[key] = escape(value) if isinstance(value, str) else value
        data["message"] = escape(record.getMessage())
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        # ensure_ascii (the default) also keeps any character a terminal or a
        # shipper might treat specially out of the raw line.
        return json.dumps(data)


def configure(level: str = "INFO", fmt: str = "plain", prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter(f"%(asctime)s %(levelname)-7s {escape(prefix)}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every connection failure with a traceback; the broker module
    # already turns each into one line of ours.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    logging.getLogger("git").setLevel(logging.WARNING)
