"""Secrets out of everything salmap says or stores: ``scheme://user:secret@host`` and signed-URL
query parameters (``X-Amz-Signature=...``, ``token=...``) become ``***``.

A shard or output URL may carry credentials (``s3://KEY:SECRET@bucket/...``, a presigned
``https://...?X-Amz-Signature=...``). salmap echoes URLs in error lines, failure lines, log
records and the manifest, so each of those passes its text through :func:`redact` (the
manifest through :func:`redact_obj`); :class:`RedactingFilter` does it for log records.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# userinfo of a URL: everything between "scheme://" and the "@" before the host
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")
# the same without the scheme, as a library quotes a URL's parts ("user:secret@bucket")
_BARE_USERINFO = re.compile(r"(?<![\w/:@.\-])[^\s/@'\"():]+:[^\s/@'\"]+@(?=[\w\-])")
# query parameters whose value is a credential (case-insensitive, any position in the query)
_SECRET_PARAMS = (r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                  r"x-goog-credential|signature|sig|token|access_token|sas|password|passwd|"
                  r"secret|api_key|apikey|key|awsaccesskeyid")
_QUERY = re.compile(rf"(?i)(?P<lead>[?&](?:{_SECRET_PARAMS})=)(?P<value>[^&\s'\"#]+)")


def redact(text: str) -> str:
    """``text`` with URL credentials and secret query values replaced by ``***``.

    >>> redact("s3://AKIA:hunter2@bucket/a.tar failed")
    's3://***@bucket/a.tar failed'
    """
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _BARE_USERINFO.sub(f"{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{MASK}", text)


def redact_obj(obj: Any) -> Any:
    """:func:`redact` applied to every string in a JSON-like structure (keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and formatted traceback text) with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's business
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


REDACTING = RedactingFilter()


def redact_logging(*loggers: logging.Logger) -> None:
    """Add :data:`REDACTING` to the handlers of ``loggers`` (default: the root logger and
    salmap's), once each."""
    own = logging.getLogger("salmap")
    if REDACTING not in own.filters:  # its records, whichever handler (or none) prints them
        own.addFilter(REDACTING)
    for logger in loggers or (logging.getLogger(), own):
        for handler in logger.handlers:
            if REDACTING not in handler.filters:
                handler.addFilter(REDACTING)
