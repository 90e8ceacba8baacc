"""Kafka messages -> landing frames: records (one frame per source) and dead letters.

The Kafka bridge (:mod:`landing_zone.kafka_bridge`) cuts its consumed messages into
batches; :func:`prepare_batch` turns one batch into the frames it lands and the
positions it may commit once they are durable. See the bridge's module docstring for
the record shape (payload columns, lineage columns) and what makes a message poison.

This is the bridge's hot path, run for every message. :meth:`MessageColumns.of`
reads the consumed messages only through the C accessors of
``confluent_kafka.Message`` mapped over the whole list (``map(Message.value,
messages)``: no Python frame per message); :func:`prepare_batch` decodes all JSON
payloads of a source with one NDJSON parse and builds the lineage columns as Polars
series. Per-message Python runs only for what is rare: a batch holding a poison
message, a key or raw payload that is not UTF-8, message headers.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal, cast

import polars as pl
from confluent_kafka import Message

from landing_zone.formats import MalformedBatch, decode_batch
from landing_zone.writer import DEAD_LETTER_COLUMNS

ORIGIN = "kafka"
KAFKA_LINEAGE_COLUMNS = (
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_key",
    "kafka_key_base64",
    "kafka_timestamp",
    "kafka_headers",
)
RAW_PAYLOAD_COLUMNS = ("payload_base64", "payload_text")

PayloadFormat = Literal["json", "raw"]
Position = tuple[str, int]
HeaderValue = str | bytes | None
Headers = dict[str, HeaderValue] | list[tuple[str, HeaderValue]]

_LINE_PREFIX = re.compile(r"^line \d+: ")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"
_NO_HEADERS = "{}"


@dataclass
class PreparedBatch:
    """The landing frames of a batch of messages and the positions they complete."""

    writes: list[tuple[str | None, pl.DataFrame]]  # (source, frame); None: dead letters
    positions: dict[Position, int]  # next offset to consume, per partition
    messages: int


def unmapped_error(topic: str) -> str:
    """The dead-letter error of a message whose topic has no valid source name."""
    return (
        f"topic {topic!r} has no valid landing source name: map it in the bridge's "
        "'sources' (topic -> lowercase identifier)"
    )


@dataclass
class MessageColumns:
    """Consumed data messages, one list per field: what the bridge keeps of them.

    Taken from the ``Message`` objects as soon as they are consumed, so those die
    young: a batch of thousands of live ``Message`` objects (each tracked by the cyclic
    garbage collector) costs full collections, while these lists hold only bytes,
    strings and integers, which the collector never looks at.
    """

    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    timestamps: list[int | None]  # epoch milliseconds; None: the broker reports none
    headers: list[str]  # the kafka_headers text

    @classmethod
    def empty(cls) -> MessageColumns:
        """No messages."""
        return cls([], [], [], [], [], [], [])

    @classmethod
    def of(cls, messages: Sequence[Message]) -> MessageColumns:
        """The fields of data messages (no error events: raises :class:`ValueError`)."""
        topics = list(map(Message.topic, messages))
        partitions = list(map(Message.partition, messages))
        offsets = list(map(Message.offset, messages))
        if None in topics or None in partitions or None in offsets:
            raise ValueError("consumed a message without a position (an error event?)")
        raw_headers = list(map(Message.headers, messages))
        if raw_headers.count(None) == len(raw_headers):
            headers = [_NO_HEADERS] * len(raw_headers)
        else:
            memo: dict[object, str] = {}  # most messages repeat a few header sets
            headers = [_cached_headers(h, memo) for h in raw_headers]
        return cls(
            cast(list[str], topics),
            cast(list[int], partitions),
            cast(list[int], offsets),
            list(map(Message.key, messages)),
            list(map(Message.value, messages)),
            _timestamps(messages),
            headers,
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def extend(self, other: MessageColumns) -> None:
        """Append ``other``'s messages."""
        self.topics.extend(other.topics)
        self.partitions.extend(other.partitions)
        self.offsets.extend(other.offsets)
        self.keys.extend(other.keys)
        self.values.extend(other.values)
        self.timestamps.extend(other.timestamps)
        self.headers.extend(other.headers)

    def payload_bytes(self) -> int:
        """The bytes of the values and keys (what the batch size bound counts)."""
        size = sum(map(len, filter(None, self.values)))
        if self.keys.count(None) != len(self.keys):  # most messages have no key
            size += sum(map(len, filter(None, self.keys)))
        return size

    def first_offsets(self) -> dict[Position, int]:
        """The lowest offset per partition."""
        firsts: dict[Position, int] = {}
        positions = zip(self.topics, self.partitions, strict=True)
        for position, offset in zip(positions, self.offsets, strict=True):
            if offset < firsts.get(position, offset + 1):
                firsts[position] = offset
        return firsts


def _timestamps(messages: Sequence[Message]) -> list[int | None]:
    pairs = list(map(Message.timestamp, messages))  # (kind, epoch ms)
    if 0 in map(itemgetter(0), pairs):  # kind 0: TIMESTAMP_NOT_AVAILABLE
        return [stamp if kind else None for kind, stamp in pairs]
    return list(map(itemgetter(1), pairs))


def prepare_batch(
    batch: MessageColumns,
    payload_format: PayloadFormat,
    source_of: Callable[[str], str | None],
    received_at: str,
) -> PreparedBatch:
    """Turn consumed data messages into landing frames.

    ``source_of`` maps a topic to its landing source (``None``: its messages become
    dead letters); ``received_at`` stamps the dead letters.
    """
    topics, values = batch.topics, batch.values
    positions = _positions(batch)
    lineage = _lineage(batch)
    sources = {topic: source_of(topic) for topic in set(topics)}
    groups: list[tuple[str | None, list[int] | None]]  # None: every message of the batch
    if len(set(sources.values())) == 1:
        groups = [(next(iter(sources.values())), None)]
    else:
        by_source: dict[str | None, list[int]] = {}
        for index, topic in enumerate(topics):
            by_source.setdefault(sources[topic], []).append(index)
        groups = list(by_source.items())

    writes: list[tuple[str | None, pl.DataFrame]] = []
    letters: list[tuple[int, str]] = []
    for source, indexes in groups:
        chosen = values if indexes is None else [values[i] for i in indexes]
        if source is None:
            everyone = range(len(values)) if indexes is None else indexes
            letters.extend((i, unmapped_error(topics[i])) for i in everyone)
            continue
        payload: pl.DataFrame | None
        rows: list[int] | None  # positions in `chosen` of the payload rows; None: all
        if payload_format == "raw":
            payload, rows = _raw_payload(chosen), None
        else:
            payload, rows, errors = _json_payload(chosen)
            letters.extend(
                (i if indexes is None else indexes[i], error) for i, error in errors.items()
            )
        if payload is None:
            continue
        if indexes is not None:
            rows = indexes if rows is None else [indexes[i] for i in rows]
        records = _with_lineage(payload, lineage if rows is None else lineage[rows])
        if records.height:
            writes.append((source, records))
    if letters:
        letters.sort()
        writes.append((None, _dead_letters(values, lineage, letters, received_at)))
    return PreparedBatch(writes, positions, len(batch))


# ------------------------------------------------------------------ lineage


def _positions(batch: MessageColumns) -> dict[Position, int]:
    """The next offset to consume per partition: its last offset in the batch + 1.

    librdkafka delivers a partition's messages in offset order, so its last one in the
    batch has the highest offset.
    """
    topics, partitions, offsets = batch.topics, batch.partitions, batch.offsets
    count = len(offsets)
    if topics.count(topics[0]) == count and partitions.count(partitions[0]) == count:
        return {(topics[0], partitions[0]): max(offsets) + 1}  # the common case: C speed
    last = dict(zip(zip(topics, partitions, strict=True), offsets, strict=True))
    return {position: offset + 1 for position, offset in last.items()}


def _lineage(batch: MessageColumns) -> pl.DataFrame:
    """The lineage columns of every message, in :data:`KAFKA_LINEAGE_COLUMNS` order."""
    keys, key_flags = _keys(batch.keys)
    return pl.DataFrame(
        [
            pl.Series("kafka_topic", batch.topics, dtype=pl.String),
            pl.Series("kafka_partition", batch.partitions, dtype=pl.Int64).cast(pl.String),
            pl.Series("kafka_offset", batch.offsets, dtype=pl.Int64).cast(pl.String),
            keys.alias("kafka_key"),
            key_flags.alias("kafka_key_base64"),
            # The epoch milliseconds are UTC: formatting them as naive datetimes is the
            # same text, and cheaper than going through a time zone.
            pl.Series("kafka_timestamp", batch.timestamps, dtype=pl.Int64)
            .cast(pl.Datetime("ms"))
            .dt.to_string(_TIMESTAMP_FORMAT),
            pl.Series("kafka_headers", batch.headers, dtype=pl.String),
        ]
    )


def _keys(raw: list[bytes | None]) -> tuple[pl.Series, pl.Series]:
    """``kafka_key`` (UTF-8 text, or base64 of bytes that are not) and ``kafka_key_base64``."""
    count = len(raw)
    if raw.count(None) == count:
        return (
            pl.repeat(None, count, dtype=pl.String, eager=True),
            pl.repeat("false", count, dtype=pl.String, eager=True),
        )
    if _all_utf8(raw):
        return (
            pl.Series(raw, dtype=pl.Binary).cast(pl.String),
            pl.repeat("false", count, dtype=pl.String, eager=True),
        )
    texts: list[str | None] = []
    flags: list[str] = []
    for key in raw:
        text, flag = _key_text(key)
        texts.append(text)
        flags.append(flag)
    return pl.Series(texts, dtype=pl.String), pl.Series(flags, dtype=pl.String)


def _all_utf8(values: list[bytes | None]) -> bool:
    """Whether every non-null value is valid UTF-8, checked in one decode.

    A NUL between the values cannot complete or continue a multi-byte sequence, so the
    joined bytes decode exactly when each value does.
    """
    try:
        b"\x00".join(filter(None, values)).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _key_text(key: bytes | None) -> tuple[str | None, str]:
    if key is None:
        return None, "false"
    try:
        return key.decode("utf-8"), "false"
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii"), "true"


def _header_value(value: bytes | str | None) -> object:
    if value is None or isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


def _headers_json(headers: Headers | None) -> str:
    if not headers:
        return "{}"
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    out: dict[str, object] = {}
    repeated: set[str] = set()
    for name, raw in pairs:
        value = _header_value(raw)
        if name not in out:
            out[name] = value
        elif name in repeated:
            held = out[name]
            assert isinstance(held, list)
            held.append(value)
        else:
            out[name] = [out[name], value]
            repeated.add(name)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _cached_headers(raw: Headers | None, memo: dict[object, str]) -> str:
    if not raw:
        return _NO_HEADERS
    key = tuple(raw) if isinstance(raw, list) else None
    text = memo.get(key) if key is not None else None
    if text is None:
        text = _headers_json(raw)
        if key is not None:
            memo[key] = text
    return text


def _with_lineage(payload: pl.DataFrame, lineage: pl.DataFrame) -> pl.DataFrame:
    """Payload columns, then the lineage columns (colliding payload names get a prefix)."""
    if not payload.width:
        return lineage
    taken = set(payload.columns) | set(KAFKA_LINEAGE_COLUMNS)
    renames: dict[str, str] = {}
    for name in payload.columns:
        if name in KAFKA_LINEAGE_COLUMNS:
            new = f"payload_{name}"
            while new in taken:
                new = f"payload_{new}"
            taken.add(new)
            renames[name] = new
    return pl.concat([payload.rename(renames), lineage], how="horizontal")


# ------------------------------------------------------------------ payloads


def _raw_payload(values: list[bytes | None]) -> pl.DataFrame:
    """``payload_base64`` (the exact bytes) and ``payload_text`` (null if not UTF-8)."""
    binary = pl.Series(values, dtype=pl.Binary)
    if _all_utf8(values):
        texts = binary.cast(pl.String)
    else:
        texts = pl.Series([_utf8_or_none(v) for v in values], dtype=pl.String)
    return pl.DataFrame(
        {"payload_base64": binary.bin.encode("base64"), "payload_text": texts},
        schema=dict.fromkeys(RAW_PAYLOAD_COLUMNS, pl.String),
    )


def _utf8_or_none(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _json_payload(
    values: list[bytes | None],
) -> tuple[pl.DataFrame | None, list[int] | None, dict[int, str]]:
    """The records of the JSON-object values, which values they are, and each other's error.

    Returns ``(payload, rows, errors)``: ``rows`` lists the indexes of the values that
    made the payload rows (``None``: all of them, in order), ``errors`` maps the index
    of every other value to why it is not one JSON object.
    """
    # Fast path: one parse of the whole batch when nothing is visibly poison.
    if None not in values and b"" not in values:
        clean: list[bytes] = values  # type: ignore[assignment]
        if not any(map(bytes.isspace, clean)):
            payload = _decode_objects(clean)
            if payload is not None:
                return payload, None, {}
    # Some value is poison: find each one (per value, in Python: only on this path).
    errors: dict[int, str] = {}
    for index, value in enumerate(values):
        if value is None:
            errors[index] = "message has a null value (tombstone), not a JSON object"
        elif not value or value.isspace():
            errors[index] = "empty message value, not a JSON object"
        else:
            error = _json_error(value)
            if error is not None:
                errors[index] = error
    good = [i for i in range(len(values)) if i not in errors]
    if not good:
        return None, None, errors
    chosen: list[bytes] = [values[i] or b"" for i in good]
    payload = _decode_objects(chosen)
    if payload is None:  # formats disagrees with the check above: decode one by one
        payload, more = _decode_each(chosen)
        errors.update((good[i], error) for i, error in more.items())
        good = [g for i, g in enumerate(good) if i not in more]
    return payload, good, errors


def _decode_objects(values: list[bytes]) -> pl.DataFrame | None:
    """One raw frame row per value (each one JSON object), or None if any is not one."""
    data = b"\n".join(values)
    if data.count(b"\n") != len(values) - 1:
        # A raw newline can only be insignificant whitespace in valid JSON (strings must
        # escape it), so flattening each value onto one line keeps one line per message.
        data = b"\n".join(v.replace(b"\n", b" ") for v in values)
    try:
        frame = decode_batch(data, "ndjson")
    except MalformedBatch:
        return None
    return frame if frame.height == len(values) else None


def _decode_each(values: list[bytes]) -> tuple[pl.DataFrame | None, dict[int, str]]:
    frames: list[pl.DataFrame] = []
    errors: dict[int, str] = {}
    for index, value in enumerate(values):
        try:
            frame = decode_batch(value.replace(b"\n", b" "), "ndjson")
        except MalformedBatch as exc:
            errors[index] = _LINE_PREFIX.sub("", str(exc))
            continue
        if frame.height != 1:
            errors[index] = "expected exactly one JSON object"
            continue
        frames.append(frame if frame.width else pl.DataFrame({"__empty": [None]}))
    if not frames:
        return None, errors
    merged = pl.concat(frames, how="diagonal")
    if "__empty" in merged.columns:
        merged = merged.drop("__empty")
    return merged, errors


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _json_error(value: bytes) -> str | None:
    """Why ``value`` is not one JSON object (None when it is)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}: {exc.reason}"
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(parsed, dict):
        return f"expected a JSON object, got {_json_kind(parsed)}"
    return None


# ------------------------------------------------------------- dead letters


def _dead_letters(
    values: list[bytes | None],
    lineage: pl.DataFrame,
    letters: list[tuple[int, str]],
    received_at: str,
) -> pl.DataFrame:
    rows = [i for i, _ in letters]
    chosen = lineage[rows]
    payloads = [
        None if values[i] is None else base64.b64encode(values[i] or b"").decode("ascii")
        for i in rows
    ]
    head = pl.DataFrame(
        {
            "origin": [ORIGIN] * len(rows),
            "topic": chosen.get_column("kafka_topic"),
            "payload_base64": payloads,
            "error": [error for _, error in letters],
            "received_at": [received_at] * len(rows),
        },
        schema=dict.fromkeys(DEAD_LETTER_COLUMNS, pl.String),
    )
    return pl.concat([head, chosen], how="horizontal")


__all__ = [
    "KAFKA_LINEAGE_COLUMNS",
    "ORIGIN",
    "RAW_PAYLOAD_COLUMNS",
    "MessageColumns",
    "PayloadFormat",
    "PreparedBatch",
    "prepare_batch",
    "unmapped_error",
]
