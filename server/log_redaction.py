"""Keeps secrets out of log lines: the value of an `api_key` query parameter (how the
dashboard's EventSource authenticates, server/routes/deps.py) becomes `***` in every record
that carries a URL, uvicorn's access log above all. The rest of the line is kept.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

SECRET_PARAMS = frozenset({"api_key"})
_QUERY_PARAM = re.compile(r'([?&])([^=&\s"]+)=([^&\s"]*)')


def redact(text: str) -> str:
    """`/v1/x?api_key=s&n=1` -> `/v1/x?api_key=***&n=1`."""

    def hide(match: re.Match[str]) -> str:
        # Compared decoded, as the server reads it: `api%5Fkey=` is the key too.
        if unquote_plus(match[2]).lower() in SECRET_PARAMS:
            return f"{match[1]}{match[2]}=***"
        return match[0]

    return _QUERY_PARAM.sub(hide, text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        # Arguments stay a tuple of the same length: uvicorn's access formatter unpacks them.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_logs() -> None:
    """Filter every handler configured so far (call it after uvicorn configures its own).
    On handlers, not loggers: a logger's filters miss records propagated from its children."""
    redactor = RedactSecrets()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):  # placeholders have none
            handler.addFilter(redactor)
