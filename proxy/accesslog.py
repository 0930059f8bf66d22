"""Structured logs: one JSON access-log line per request, and JSON (or plain text) for everything else.

Records are formatted in the calling thread and written in batches by a background thread, so a slow
stdout never blocks the event loop.
"""

from __future__ import annotations

import collections
import hashlib
import json as jsonlib
import logging
import os
import re
import select
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterator, Mapping

from proxy.auth.principal import Principal

ACCESS_LOGGER = "edge_proxy.access"

# The access-log schema (contract for log pipelines); other keys passed to `log_access` are dropped.
ACCESS_FIELDS: tuple[str, ...] = (
    "request_id", "method", "path", "route", "status", "principal_type", "principal_id", "end_user",
    "model", "provider", "upstream_status", "duration_ms", "ttfb_ms",
    "tokens_in", "tokens_out", "credits", "error", "deployment", "attempts",
    "admin_action", "admin_target", "admin_reason", "admin_actor",
)
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

# Belt and braces: text shaped like a credential is never written, whatever the caller passed.
_SECRET_SHAPED = re.compile(
    r"(?i:bearer)\s+[A-Za-z0-9\-._~+/]+=*"  # an Authorization value, whatever it carries
    r"|(?<![A-Za-z0-9_])sk_[A-Za-z0-9_-]{8,}"  # an API key (not the tail of a word like disk_usage)
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # a JWT (its header is base64url JSON: `{"`)
)
REDACTED = "[redacted]"

_access_logger = logging.getLogger(ACCESS_LOGGER)
_writer: BatchingWriter | None = None


def principal_log_id(principal: Principal | None) -> str | None:
    """A stable, non-secret caller id: the API key id, else a short hash of issuer and subject."""
    if principal is None:
        return None
    if principal.key_id:
        return principal.key_id
    return end_user_log_id(principal) or principal.account


def end_user_log_id(principal: Principal | None) -> str | None:
    """The end user a call is made for (a token's `sub`, `X-End-User-Id`), as a short hash of issuer and subject:
    stable for joining lines, never the id itself."""
    if principal is None or not principal.subject:
        return None
    digest = hashlib.sha256(f"{principal.issuer or ''}|{principal.subject}".encode()).hexdigest()
    return f"sub_{digest[:12]}"


def _scrub(value: Any) -> Any:
    """Replace secret-shaped strings; other values pass unchanged."""
    if isinstance(value, str) and _SECRET_SHAPED.search(value):
        return REDACTED
    return value


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced."""
    return _SECRET_SHAPED.sub(REDACTED, text)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The record's traceback, formatted once and cached in `exc_text` (as the logging module does), so the
    formatters write what `RedactSecrets` left there."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


_TRACEBACKS = logging.Formatter()


class RedactSecrets(logging.Filter):
    """Redacts credential-shaped text from a record's message, traceback and stack, whoever logged it
    (aiohttp, a client library quoting a request): defense in depth behind never logging requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _SECRET_SHAPED.search(message):
            record.msg, record.args = redact(message), ()
        if exc := _exception_text(_TRACEBACKS, record):
            record.exc_text = redact(exc)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def access_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record reduced to the schema, query strings cut from the path, secret-shaped values redacted."""
    fields = {key: record.get(key) for key in ACCESS_FIELDS}
    if isinstance(fields["path"], str):
        fields["path"] = fields["path"].split("?", 1)[0]  # queries may carry credentials
    # One search over every text value (NUL-separated: no pattern spans a NUL); per value only if it finds one.
    if _SECRET_SHAPED.search("\0".join(value for value in fields.values() if isinstance(value, str))):
        return {key: _scrub(value) for key, value in fields.items()}
    return fields


def log_access(record: Mapping[str, Any]) -> None:
    """Write one access-log line (keys: ACCESS_FIELDS; missing ones are logged as null).

    With the JSON writer as the only handler (as `configure_logging` sets it up), the line goes to the writer
    as text, without a `logging.LogRecord` (its creation, caller lookup and filters were most of the cost of a
    line); otherwise (text mode, a test's capture handler) through the logging module."""
    if not _access_logger.isEnabledFor(logging.INFO):  # also False when disabled (access_log: false)
        return
    fields = access_fields(record)
    writer = _writer
    if writer is not None and writer.takes_access_lines and logging.getLogger().handlers == [writer]:
        writer.write_line(access_line(fields))
    else:
        _access_logger.info("access", extra={"access": fields})


def access_line(fields: Mapping[str, Any]) -> str:
    """The JSON line `JsonFormatter` writes for an access record with these fields."""
    ts = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds")
    head = {"ts": ts, "level": "info", "logger": ACCESS_LOGGER, "msg": "access", "pid": os.getpid()}
    return _JSON.encode({**head, **fields})


_JSON = jsonlib.JSONEncoder(default=str, separators=(",", ":"))  # what json.dumps builds per call with these options


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, then the access fields or the exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,  # which worker process wrote it (`serve --workers`)
        }
        line.update(getattr(record, "access", None) or {})
        if exc := _exception_text(self, record):
            line["exc"] = exc
        return _JSON.encode(line)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs: `ts level logger msg key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(
            f"{key}={value}" for key, value in (getattr(record, "access", None) or {}).items() if value is not None
        )
        head = f"{_timestamp(record)} {record.levelname.lower():<7} {record.name} {record.getMessage()}"
        text = f"{head} {pairs}" if pairs else head
        if exc := _exception_text(self, record):
            text += "\n" + exc
        return text


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class BatchingWriter(logging.Handler):
    """Formats in the caller; a writer thread wakes every `interval_s` and writes what piled up in one call.

    Waking per batch instead of per line keeps the writer from contending for the GIL on every request,
    and a slow stdout still never blocks the event loop.
    """

    def __init__(self, stream: IO[str], interval_s: float = 0.05, max_pending: int = 100_000) -> None:
        super().__init__()
        self._stream = stream
        self._interval_s = interval_s
        # Bounded: if stdout stalls for long, the oldest lines are dropped rather than memory growing without end.
        self._lines: collections.deque[str] = collections.deque(maxlen=max_pending)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-proxy-log-writer", daemon=True)
        self._thread.start()

    @property
    def takes_access_lines(self) -> bool:
        """Whether `write_line` may take access lines formatted by `access_line` (JSON mode)."""
        return isinstance(self.formatter, JsonFormatter)

    def write_line(self, line: str) -> None:
        """Queue one formatted line (no newline)."""
        self._lines.append(line)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:  # logging must never raise into the request
            self.handleError(record)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the writer after it has written every line emitted so far, waiting at most `timeout_s` for it
        (None: however long it takes)."""
        self._stopping.set()
        self._thread.join(timeout_s)
        super().close()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        lines = []
        while self._lines:  # the only consumer: popleft cannot find it empty
            lines.append(self._lines.popleft())
        try:
            for chunk in _whole_line_chunks(lines):
                self._stream.write(chunk)
                self._stream.flush()
        except (OSError, ValueError):  # closed or broken stdout: keep the writer alive for the next batch
            pass


def _whole_line_chunks(lines: list[str], limit: int = select.PIPE_BUF) -> Iterator[str]:
    """`lines` joined into writes of whole lines, each at most `limit` bytes where the lines allow: worker
    processes share one stdout pipe, and only a write that small is atomic, so no line is cut by another's."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode()) + 1
        if chunk and size + length > limit:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "\n".join(chunk) + "\n"


def configure_logging(
    level: str = "info", json: bool = True, *, access_log: bool = True, stream: IO[str] | None = None,
) -> Callable[[], None]:
    """Route all logging through one batching background writer; returns `stop` (call at shutdown to flush).

    Access lines are written at INFO even when `level` is higher, unless `access_log` is False.
    """
    global _writer
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    _stop_writer()
    _writer = BatchingWriter(stream or sys.stdout)
    _writer.setFormatter(JsonFormatter() if json else TextFormatter())
    _writer.addFilter(RedactSecrets())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_writer)
    root.setLevel(level.upper())
    _access_logger.setLevel(logging.INFO)
    _access_logger.disabled = not access_log
    return _stop_writer


def _stop_writer(timeout_s: float | None = None) -> None:
    """Flush pending lines and stop the writer thread, if one runs, waiting at most `timeout_s` for it."""
    global _writer
    writer, _writer = _writer, None  # another thread may stop it too (`flush_logs`)
    if writer is not None:
        logging.getLogger().removeHandler(writer)
        writer.close(timeout_s)


def flush_logs(timeout_s: float) -> None:
    """The process is about to end: write the lines logged so far, unless stdout takes longer than `timeout_s`
    (a stalled log reader must not keep the process)."""
    _stop_writer(timeout_s)
