"""Column names for raw records: whatever senders invent must be storable in Delta.

Invariant protected here: no record field can make a bronze append fail or shadow
a column the platform itself writes. Delta (without column mapping) forbids some
characters and compares names case-insensitively; the platform reserves its
lineage, change-feed and quarantine columns.
"""

from __future__ import annotations

import re

LINEAGE_COLUMNS = (
    "_source",
    "_landing_file",
    "_batch_id",
    "_row",
    "_ingested_at",
    "_file_order",
)
CHANGE_FEED_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")
QUARANTINE_COLUMNS = ("_reason", "_bronze_version", "_quarantined_at")
# Computed in silver: the arrival order of a row, and its raw fields as one struct.
SILVER_WORK_COLUMNS = ("_arrival", "_raw")
# Partition columns derived from a row's times.
INGEST_DATE = "_ingest_date"
EVENT_DATE = "_event_date"
PLATFORM_COLUMNS = frozenset(
    name.lower()
    for name in (*LINEAGE_COLUMNS, *CHANGE_FEED_COLUMNS, *SILVER_WORK_COLUMNS, INGEST_DATE)
)
RESERVED_COLUMNS = PLATFORM_COLUMNS | {
    name.lower() for name in (*QUARANTINE_COLUMNS, "_rescued_data", EVENT_DATE)
}
MAX_NAME_LENGTH = 255

# Characters Delta forbids in names without column mapping, plus control characters.
_INVALID_CHARS = re.compile(r"[ ,;{}()=`\x00-\x1f\x7f]")


def delta_safe_names(columns: list[str], spellings: dict[str, str]) -> dict[str, str]:
    """Map each raw field name of one frame to a name bronze can store.

    ``spellings`` maps lower-cased names to the spelling already used (by the table,
    or by earlier frames of the same batch) and is updated: ``Unit`` arriving after
    ``unit`` joins the ``unit`` column, as case-insensitive Delta readers expect.
    Within one frame, names that clash case-insensitively or with a reserved column
    get a numeric suffix.
    """
    used: set[str] = set()
    mapping: dict[str, str] = {}
    for column in columns:
        base = _INVALID_CHARS.sub("_", column)[:MAX_NAME_LENGTH] or "_blank"
        candidate, suffix = base, 0
        while candidate.lower() in RESERVED_COLUMNS or candidate.lower() in used:
            suffix += 1
            candidate = f"{base}_{suffix}"
        lower = candidate.lower()
        used.add(lower)
        mapping[column] = spellings.setdefault(lower, candidate)
    return mapping


def case_variants(columns: list[str]) -> list[list[str]]:
    """Groups of raw field names that Delta would store as the same column.

    (``Unit`` and ``unit``, or ``a b`` and ``a_b``): one sender spelling a field
    two ways in one batch.
    """
    groups: dict[str, list[str]] = {}
    for column in columns:
        base = (_INVALID_CHARS.sub("_", column)[:MAX_NAME_LENGTH] or "_blank").lower()
        groups.setdefault(base, []).append(column)
    return [names for names in groups.values() if len(names) > 1]
