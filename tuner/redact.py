"""One function that every line the tools print or log about a URI goes through.

``postgresql://user:PASSWORD@host/db``, ``https://TOKEN@mlflow.example`` and
``s3://KEY:SECRET@bucket/x`` carry credentials in their userinfo (the part before ``@``).
:func:`redact_uris` replaces every userinfo in a text by ``***``, so that command lines (the MLflow
``command`` tag, ``report.md``), error lines, warnings and report notes never show a password.
"""

from __future__ import annotations

import re

__all__ = ["redact_uris"]

# scheme://USERINFO@ : the userinfo runs to the last "@" before the host (a raw "@" inside a
# password included), never across a space, "/", "?" or "#"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")


def redact_uris(text: object) -> str:
    """``str(text)`` with the userinfo of every URI in it replaced by ``***``:
    ``postgresql://u:pw@db/x`` -> ``postgresql://***@db/x``; text without one is unchanged."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
