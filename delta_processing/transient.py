"""Storage outages, told apart from errors caused by the data being written.

A stage that gives up on its input after repeated failures (bronze sets a claim's
landing files aside, see :mod:`delta_processing.bronze`) must only count failures
the input itself causes. An object store that is down, restarting, throttling or
refusing our credentials fails every commit the same way, whatever the data:
those failures are retried with back-off for as long as the outage lasts, and
acknowledged files never leave the pipeline because of them.

What deltalake 1.6 raises when the object store is unreachable (seen against
Azurite killed, a port nobody listens on, a server answering 503 and one that
never answers): a plain :class:`OSError` (opening a table, listing its log,
reading files) or a plain :class:`~deltalake.exceptions.DeltaError` (a write whose
upload or commit fails), whose message carries object_store's request error::

    Generic MicrosoftAzure error: Error performing PUT http://.../part-0.parquet
    in 289ms, after 2 retries, max_retries: 2, retry_timeout: 180s
    - HTTP error: error sending request

(the ``OSError`` form spreads the same text over lines with ANSI colours). The
cause is ``HTTP error`` for transport failures (connection refused or reset,
timeouts) and ``Server returned non-2xx status code: <status>`` for answers.

A change-feed stream that fails while it is read raises a plain :class:`Exception`
(``C Data interface error: External error: ...``) with the same text. Only those
exact exception classes are read: subclasses such as
``SchemaMismatchError`` or ``CommitFailedError`` are about the table or the data,
and their messages can quote field names a sender chose.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

from deltalake.exceptions import DeltaError

# Statuses that say the store (or our access to it) is unavailable, not the request:
# 5xx, request timeout, throttling, and credentials the store refuses (an operator
# fixes those; the data waits meanwhile).
UNAVAILABLE_STATUSES = frozenset({401, 403, 408, 429})
# Local disks that fill up are an outage too (the tables may live on local disk).
_UNAVAILABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# object_store's request error (``in <elapsed>``, then ``, after <n> retries`` if it
# retried): the signature of a request to the store that failed.
_REQUEST_FAILED = re.compile(r"Error performing [A-Z]+ \S+ in \S+")
_TRANSPORT = re.compile(
    r"HTTP error|error sending request|timed out|connection (?:refused|reset|closed)",
    re.IGNORECASE,
)
_STATUS = re.compile(r"non-2xx status code\W+(\d{3})")
# How a failed change-feed stream read begins (a plain Exception from the Arrow C stream).
_STREAM_ERROR = "C Data interface error: External error:"
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded")


def is_storage_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a storage outage.

    True for a failed request to the object store (transport error, 5xx, 408,
    429, 401/403), a Python connection error or timeout, and a full local disk;
    false for anything else, in particular errors about the data or the table.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_outage(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _UNAVAILABLE_ERRNOS:
        return True
    message = _ANSI.sub("", str(exc))
    stream = type(exc) is Exception and message.startswith(_STREAM_ERROR)
    if type(exc) not in (OSError, DeltaError) and not stream:
        return False
    if _DISK_FULL.search(message):
        return True
    if not _REQUEST_FAILED.search(message):
        return False
    status = _STATUS.search(message)
    if status is not None:
        code = int(status.group(1))
        return code >= 500 or code in UNAVAILABLE_STATUSES
    return _TRANSPORT.search(message) is not None


def brief(exc: BaseException) -> str:
    """A one-line description of ``exc`` for logs (object_store's errors span lines)."""
    text = " ".join(_ANSI.sub("", str(exc)).replace("↳", "").split())
    return f"{type(exc).__name__}: {text}"[:1000]


class StorageUnavailableError(ConnectionError):
    """A stage could not reach its storage; retry later, the input is not at fault."""


def outage_behind(exc: BaseException, probe: Callable[[], object]) -> bool:
    """Whether ``exc`` came from a storage outage, asking the store when in doubt.

    An error of a shape not recognised here (deltalake's messages change between
    versions) still counts as an outage if ``probe`` (a cheap read of the same
    store, e.g. opening the table) fails with one right after.
    """
    if is_storage_unavailable(exc):
        return True
    try:
        probe()
    except BaseException as failed:  # deltalake panics are BaseExceptions
        if isinstance(failed, KeyboardInterrupt | SystemExit):
            raise
        return is_storage_unavailable(failed)
    return False
