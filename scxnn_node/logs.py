"""Logging set-up and redaction: plain or JSON lines; patient identifiers (UIDs) only ever at
DEBUG, hashed everywhere else, and never a database password, in logs or in stored errors."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from datetime import UTC, datetime

# The DICOM standard's own UIDs (SOP classes, transfer syntaxes) identify no one: kept readable.
_STANDARD_UID_ROOT = "1.2.840.10008."
# Digits and dots with at least two dots, not part of a longer number.
_UID_SHAPED = re.compile(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+){2,}(?!\d)")
# A quoted value in the validators' messages ("Invalid 'X' value '...'"): UID or not, the value
# is what a sender wrote into an identifier.
_QUOTED_VALUE = re.compile(r"(value ')([^']{1,64})(')")
# scheme://user:password@ in a URL: the password is everything up to the host's '@'.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^\s]*@(?=[^@\s]*(?:\s|$))")
_URL_PASSWORD_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


def short_hash(value: str) -> str:
    """A UID as logs show it at INFO: 12 hex digits of its sha256, never the UID itself."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def _is_identifier(token: str) -> bool:
    """A UID-shaped token that can identify a patient or study: long enough to be a real UID
    (an IPv4 address or a version number is not one) and outside the standard's own root."""
    return (len(token) >= 16 or token.count(".") >= 4) and not token.startswith(_STANDARD_UID_ROOT)


def hash_uids(text: str) -> str:
    """`text` with every UID-shaped identifier replaced by its short_hash (as stored errors and
    logs at INFO show them)."""
    text = _UID_SHAPED.sub(
        lambda m: short_hash(m.group()) if _is_identifier(m.group()) else m.group(), text
    )
    return _QUOTED_VALUE.sub(
        lambda m: (
            m.group(1)
            + (m.group(2) if m.group(2).startswith(_STANDARD_UID_ROOT) else short_hash(m.group(2)))
            + m.group(3)
        ),
        text,
    )


def redact_url(url: str) -> str:
    """A URL as it may be printed or logged: its password replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def redact(text: str) -> str:
    """Free text (an error message, a log line) with UIDs hashed and URL passwords hidden."""
    return hash_uids(_URL_PASSWORD_IN_TEXT.sub(r"\1***@", text))


class RedactingFilter(logging.Filter):
    """Rewrites every record at INFO and above so that it carries no UID and no password,
    whichever library logged it (pydicom's and pynetdicom's validators quote the UIDs they
    check; a driver's error can quote a connection URL); DEBUG keeps the raw text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def exception_line(exc: BaseException) -> str:
    """An exception as a log line: its kind and the start of its message (Inductor's and CUDA's
    run to pages)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def configure_logging(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pydicom's validators also raise Python warnings with the same text: through logging, so
    # that the filter sees them, instead of straight to stderr.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO, with patient names in dataset dumps at DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # A task still running at its next interval is skipped and retried: not worth a warning.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))  # logs UIDs
    # Alembic names its dialect at INFO each time the node reads the schema revision.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
