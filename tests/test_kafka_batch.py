"""Kafka messages -> landing frames (landing_zone/kafka_batch.py), without a broker.

``confluent_kafka.Message`` can be built directly, so the whole-batch code path is
checked here against a per-message reading of the contract in the bridge's module
docstring: every lineage column, which message lands where (records of which source,
dead letters with which error), and the positions a batch lets the bridge commit.
"""

from __future__ import annotations

import base64
import gc
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landing_zone.kafka_batch import (
    KAFKA_LINEAGE_COLUMNS,
    MessageColumns,
    PreparedBatch,
    prepare_batch,
    unmapped_error,
    warm_up,
)

RECEIVED = "2026-11-22T12:00:00+00:00"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SOURCES = {"plant": "readings", "plant.b": "readings", "other": "other_src", "1bad": None}
# Topic ids as the bridge learned them; "other" has none (the cluster did not name it).
TOPIC_IDS = {"plant": "AaIFUAcYe9KSNczfAJcVMQ", "plant.b": "AaIFUAcjdDG0Eb+CHRnr8g", "1bad": "x"}


def source_of(topic: str) -> str | None:
    return SOURCES[topic]


def message(
    value: bytes | None,
    *,
    topic: str = "plant",
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    timestamp: tuple[int, int] = (1, 1_795_000_000_123),
) -> Message:
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=headers,
        timestamp=timestamp,
    )


def prepare(
    messages: list[Message], payload_format: Any = "json", chunk: int | None = None
) -> PreparedBatch:
    """Prepare ``messages`` as the bridge does: taken ``chunk`` at a time (one consume
    call each), all at once by default."""
    columns = columns_of(messages, chunk)
    return prepare_batch(columns, payload_format, source_of, RECEIVED, TOPIC_IDS)


def columns_of(messages: list[Message], chunk: int | None = None) -> MessageColumns:
    columns = MessageColumns.empty()
    step = chunk or max(1, len(messages))
    for start in range(0, len(messages), step):
        columns.extend(MessageColumns.of(messages[start : start + step]))
    return columns


def frames(batch: PreparedBatch) -> dict[str | None, pl.DataFrame]:
    return dict(batch.writes)


# --------------------------------------------------------------- reference


def expected_lineage(m: Message) -> dict[str, str | None]:
    """The lineage columns of one message, as the bridge's docstring spells them out."""
    key = m.key()
    if key is None:
        key_text, flag = None, "false"
    else:
        try:
            key_text, flag = key.decode("utf-8"), "false"
        except UnicodeDecodeError:
            key_text, flag = base64.b64encode(key).decode(), "true"
    kind, stamp = m.timestamp()
    when = None
    if kind:
        moment = EPOCH + timedelta(milliseconds=stamp)
        when = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp % 1000:03d}Z"
    headers: dict[str, Any] = {}
    seen: dict[str, int] = {}
    raw_headers = m.headers() or []
    assert isinstance(raw_headers, list)
    for name, raw in raw_headers:
        if raw is None or isinstance(raw, str):
            value: Any = raw
        else:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = {"base64": base64.b64encode(raw).decode()}
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 1:
            headers[name] = value
        elif seen[name] == 2:
            headers[name] = [headers[name], value]
        else:
            headers[name].append(value)
    return {
        "kafka_topic": m.topic(),
        "kafka_topic_id": TOPIC_IDS.get(topic_of(m)),
        "kafka_partition": str(m.partition()),
        "kafka_offset": str(m.offset()),
        "kafka_key": key_text,
        "kafka_key_base64": flag,
        "kafka_timestamp": when,
        "kafka_headers": json.dumps(headers, ensure_ascii=False, separators=(",", ":")),
    }


def topic_of(m: Message) -> str:
    topic = m.topic()
    assert topic is not None
    return topic


def lineage_of(frame: pl.DataFrame) -> list[dict[str, str | None]]:
    return frame.select(KAFKA_LINEAGE_COLUMNS).to_dicts()


# ------------------------------------------------------------------- tests


keys = st.one_of(st.none(), st.binary(max_size=6), st.text(max_size=4).map(str.encode))
header_values = st.one_of(st.none(), st.binary(max_size=4), st.text(max_size=3).map(str.encode))
headers = st.one_of(
    st.none(),
    st.lists(st.tuples(st.sampled_from(["a", "b", "ü"]), header_values), min_size=1, max_size=4),
)
stamps = st.one_of(
    st.just((0, -1)),  # TIMESTAMP_NOT_AVAILABLE
    st.tuples(st.sampled_from([1, 2]), st.integers(0, 4_102_444_800_000)),
)
good_values = st.fixed_dictionaries(
    {"device": st.text(max_size=5), "n": st.integers(-(2**40), 2**40)}
).map(lambda record: json.dumps(record).encode())
poison_values = st.sampled_from(
    [None, b"", b"  ", b"[1]", b'"s"', b"{", b"\xff{}", b'{"a": NaN}', b"null"]
)
specs = st.lists(
    st.tuples(
        st.sampled_from(["plant", "plant.b", "other", "1bad"]),
        st.integers(0, 2),
        keys,
        headers,
        stamps,
        st.one_of(good_values, good_values, good_values, poison_values),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=specs, chunk=st.sampled_from([None, 1, 3, 7]))
def test_every_message_lands_once_where_the_contract_says(
    specs: list[tuple[str, int, bytes | None, Any, tuple[int, int], bytes | None]],
    chunk: int | None,
) -> None:
    next_offset: dict[tuple[str, int], int] = {}
    messages = []
    for topic, partition, key, header_list, stamp, value in specs:
        offset = next_offset.get((topic, partition), 100)
        next_offset[(topic, partition)] = offset + 1
        messages.append(
            message(
                value,
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                headers=header_list,
                timestamp=stamp,
            )
        )
    batch = prepare(messages, chunk=chunk)
    out = frames(batch)

    assert batch.messages == len(messages)
    assert batch.positions == next_offset  # the last offset + 1 of each partition
    assert list(out) == sorted(out, key=lambda s: s is None)  # dead letters last
    landed: dict[str | None, list[dict[str, str | None]]] = {s: [] for s in out}
    for m in messages:
        source = SOURCES[topic_of(m)]
        value = m.value()
        record_ok = source is not None and value is not None and _is_object(value)
        landed.setdefault(source if record_ok else None, []).append(expected_lineage(m))
    for source, rows in landed.items():
        assert source in out
        assert lineage_of(out[source]) == rows, source  # each exactly once, in order
    for source, frame in out.items():
        assert all(dtype == pl.String for dtype in frame.schema.values())
        if source is not None:
            expected = [json.loads(m.value() or b"") for m in messages if _lands_in(m, source)]
            assert frame["device"].to_list() == [r["device"] for r in expected]
            assert frame["n"].to_list() == [str(r["n"]) for r in expected]


def _is_object(value: bytes) -> bool:
    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        return isinstance(json.loads(value.decode("utf-8"), parse_constant=refuse), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _lands_in(m: Message, source: str) -> bool:
    value = m.value()
    return SOURCES[topic_of(m)] == source and value is not None and _is_object(value)


def test_dead_letters_keep_the_raw_bytes_and_say_why() -> None:
    values: list[bytes | None] = [
        b'{"a": 1}',
        None,
        b"",
        b" \n ",
        b"[1, 2]",
        b"\xff\xfe{}",
        b'{"a": ',
        b'{"a": NaN}',
        b'{\n "a": 2\n}',
    ]
    messages = [message(v, offset=i) for i, v in enumerate(values)]
    messages.append(message(b'{"a": 3}', topic="1bad", offset=0))
    out = frames(prepare(messages))
    assert out["readings"]["a"].to_list() == ["1", "2"]
    assert out["readings"]["kafka_offset"].to_list() == ["0", "8"]
    letters = out[None]
    assert letters["origin"].unique().to_list() == ["kafka"]
    assert letters["received_at"].unique().to_list() == [RECEIVED]
    assert letters["topic"].to_list() == ["plant"] * 7 + ["1bad"]
    assert letters["payload_base64"].to_list() == [
        None if v is None else base64.b64encode(v).decode() for v in [*values[1:8], b'{"a": 3}']
    ]
    errors = letters["error"].to_list()
    assert errors[0].startswith("message has a null value (tombstone)")
    assert errors[1] == errors[2] == "empty message value, not a JSON object"
    assert errors[3] == "expected a JSON object, got an array"
    assert errors[4].startswith("invalid UTF-8 at byte 0")
    assert errors[5].startswith("invalid JSON: Expecting value")
    assert errors[6] == "invalid JSON: NaN is not valid JSON"
    assert errors[7] == unmapped_error("1bad")
    assert lineage_of(letters)[-1] == expected_lineage(messages[-1])


def test_payload_fields_named_like_lineage_columns_get_a_prefix() -> None:
    value = b'{"kafka_offset": "mine", "payload_kafka_offset": "taken", "x": 1}'
    frame = frames(prepare([message(value, offset=7)]))["readings"]
    row = frame.row(0, named=True)
    assert row["kafka_offset"] == "7"
    assert row["payload_kafka_offset"] == "taken"
    assert row["payload_payload_kafka_offset"] == "mine"
    assert frame.columns[:3] == ["payload_payload_kafka_offset", "payload_kafka_offset", "x"]


@pytest.mark.parametrize(
    "values",
    [
        [b"plain", b"\x00\xff binary", None, b""],
        [b"all", "utf-8 \u00fc".encode()],
    ],
)
def test_raw_payloads_keep_their_exact_bytes(values: list[bytes | None]) -> None:
    frame = frames(prepare([message(v, offset=i) for i, v in enumerate(values)], "raw"))["readings"]
    assert frame["payload_base64"].to_list() == [
        None if v is None else base64.b64encode(v).decode() for v in values
    ]
    texts = []
    for v in values:
        try:
            texts.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    assert frame["payload_text"].to_list() == texts


def test_first_offsets_and_positions_per_partition() -> None:
    messages = [
        message(b"{}", topic="plant", partition=p, offset=o)
        for p, o in [(0, 5), (1, 9), (0, 6), (1, 10), (0, 7)]
    ]
    columns = MessageColumns.of(messages)
    assert columns.first_offsets() == {("plant", 0): 5, ("plant", 1): 9}
    assert columns.payload_bytes() == 10
    batch = prepare(messages)
    assert batch.positions == {("plant", 0): 8, ("plant", 1): 11}
    assert batch.lowest == {("plant", 0): 5, ("plant", 1): 9}
    assert frames(batch)["readings"].width == len(KAFKA_LINEAGE_COLUMNS)  # `{}`: lineage only


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_partition_starting_again_goes_on_from_its_last_offset(partitions: int) -> None:
    """Offsets that go back within a batch (the topic was created again): the bridge
    commits after the last one, and reports the lowest for the topic-id check."""
    offsets = [(0, 41), (0, 42), (0, 0), (0, 1)] + ([(1, 7)] if partitions == 2 else [])
    batch = prepare([message(b"{}", partition=p, offset=o) for p, o in offsets])
    assert batch.positions[("plant", 0)] == 2
    assert batch.lowest[("plant", 0)] == 0
    if partitions == 2:
        assert batch.positions[("plant", 1)] == 8 and batch.lowest[("plant", 1)] == 7


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_payload_bytes_count_values_and_keys(chunk: int | None) -> None:
    values: list[bytes | None] = [b'{"a": 1}', b"{\n}", None, b"", b'{"b": 22}']
    messages = [message(v, offset=i, key=b"k" if i == 1 else None) for i, v in enumerate(values)]
    assert columns_of(messages, chunk).payload_bytes() == 8 + 3 + 0 + 0 + 9 + 1


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_payload_bytes_from_the_joined_lines(chunk: int | None) -> None:
    # No null value, no newline: every consume call's values are joined into one NDJSON
    # text, and the size is taken from those (empty and blank values included).
    values = [b'{"a":1}', b"", b" ", b"{}", b"x"]
    columns = columns_of([message(v, offset=i) for i, v in enumerate(values)], chunk)
    assert None not in columns.lines  # the joined lines, not the values, are counted
    assert columns.payload_bytes() == 7 + 0 + 1 + 2 + 1
    keyed = [message(v, offset=i, key=b"key") for i, v in enumerate(values)]
    assert columns_of(keyed, chunk).payload_bytes() == 11 + 3 * len(values)


def test_only_suspect_values_are_parsed_one_by_one_for_their_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import landing_zone.kafka_batch as kafka_batch

    checked: list[bytes] = []
    check = kafka_batch.json_object_error

    def spy(value: bytes) -> str | None:
        checked.append(value)
        return check(value)

    monkeypatch.setattr(kafka_batch, "json_object_error", spy)
    values = [b'{"a": %d}' % i for i in range(1000)]
    values[10], values[500] = b'{"a": ', b'"text"'
    values[700] = b'{"a": 1e400}'  # JSON to Python (not to Polars' reader): kept, not poison
    out = frames(prepare([message(v, offset=i) for i, v in enumerate(values)]))
    assert sorted(checked) == sorted([values[10], values[500], values[700]])
    assert out[None]["kafka_offset"].to_list() == ["10", "500"]
    assert out[None]["error"].to_list()[1] == "expected a JSON object, got a string"
    assert out["readings"].height == 998
    assert "700" in out["readings"]["kafka_offset"].to_list()


def test_warm_up_prepares_a_batch() -> None:
    batch = warm_up()  # no broker, no landing: only the one-off costs of a first batch
    assert [source for source, _ in batch.writes] == ["warm_up"]  # no dead letters
    assert batch.writes[0][1].height == batch.messages >= 10_000


def test_headers_are_kept_as_text_which_the_collector_does_not_track() -> None:
    # Header lists of tuples are tracked by the cyclic garbage collector; the consumed
    # messages' fields are held for batches, so only their kafka_headers text is kept.
    messages = [
        message(b"{}", offset=0, headers=[("a", b"1"), ("a", b"2")]),
        message(b"{}", offset=1),
        message(b"{}", offset=2, headers=[("a", b"1"), ("a", b"2")]),
        message(b"{}", offset=3, headers=[]),
    ]
    columns = MessageColumns.of(messages)
    assert columns.headers == ['{"a":["1","2"]}', None, '{"a":["1","2"]}', None]
    assert columns.headers[0] is columns.headers[2]  # made once per header set
    assert not any(map(gc.is_tracked, columns.headers))
    assert MessageColumns.of(messages[1:2]).headers == [None]
    frame = frames(prepare(messages))["readings"]
    assert frame["kafka_headers"].to_list() == ['{"a":["1","2"]}', "{}", '{"a":["1","2"]}', "{}"]
    assert frames(prepare(messages[1:2]))["readings"]["kafka_headers"].to_list() == ["{}"]


BLANK: list[bytes | None] = [b"", b"  ", b"\r", b" \r ", b"\t"]
MULTI_LINE: list[bytes | None] = [b"\n", b"\r\n", b'{"n": -1}\n{"n": -2}', b'{"n":\n', b"\n\n"]


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize(
    "bad",
    [BLANK, BLANK + MULTI_LINE, [*BLANK, *MULTI_LINE, None]],
    ids=["blank", "newlines", "null"],
)
def test_poison_at_the_edges_of_consume_calls_keeps_every_row_on_its_offset(
    chunk: int, bad: list[bytes | None]
) -> None:
    # One topic, so the batch is parsed as the consume calls' joined NDJSON (while no
    # value is null or spans lines: the "blank" case): a value that makes no line (empty,
    # blank, a lone \r that reads as a CRLF line end) or more than one (a newline in it)
    # must not shift the rows of the good values around it.
    spans_lines = any(v is None or b"\n" in v for v in bad)
    good = iter(
        b'{\n  "n": %d\n}' % n if spans_lines and n % 2 else json.dumps({"n": n}).encode()
        for n in range(1000)
    )
    values: list[bytes | None] = []
    for first, last in zip(bad, [*bad[1:], bad[0]], strict=True):
        if chunk == 1:  # each call is one value: bad ones between good ones
            values += [first, next(good), last, next(good)]
        else:  # a bad value first and last in a call, good ones between them
            values += [first, *(next(good) for _ in range(chunk - 2)), last]
            values += [next(good) for _ in range(chunk)]  # a call with nothing bad
    messages = [message(v, offset=i) for i, v in enumerate(values)]
    assert (columns_of(messages, chunk).ndjson() is None) == spans_lines
    out = frames(prepare(messages, chunk=chunk))

    is_bad = [v is None or v in bad for v in values]
    records = out["readings"]
    assert records["kafka_offset"].to_list() == [str(i) for i, b in enumerate(is_bad) if not b]
    assert records["n"].to_list() == [
        str(json.loads(v or b"")["n"]) for v, b in zip(values, is_bad, strict=True) if not b
    ]
    letters = out[None]
    assert letters["kafka_offset"].to_list() == [str(i) for i, b in enumerate(is_bad) if b]
    assert letters["payload_base64"].to_list() == [
        None if v is None else base64.b64encode(v).decode()
        for v, b in zip(values, is_bad, strict=True)
        if b
    ]


@pytest.mark.parametrize("values", [[b"{}"], [b" {}\n"], [b"", b"{}", None], [b"{}", b"[]"]])
def test_a_lone_empty_object_is_a_record(values: list[bytes | None]) -> None:
    # `{}` is one JSON object: a record with only lineage columns, never a dead letter,
    # even when it is the only good value of its batch.
    messages = [message(v, offset=i) for i, v in enumerate(values)]
    out = frames(prepare(messages))
    good = [str(i) for i, v in enumerate(values) if v is not None and v.strip() == b"{}"]
    assert out["readings"]["kafka_offset"].to_list() == good
    assert out["readings"].width == len(KAFKA_LINEAGE_COLUMNS)
    letters = out.get(None)
    assert (0 if letters is None else letters.height) == len(values) - len(good)


def test_an_error_event_is_refused() -> None:
    with pytest.raises(ValueError, match="without a position"):
        MessageColumns.of([Message(value=b"{}")])


def test_keys_are_checked_for_utf8_one_by_one() -> None:
    # Each key alone is not UTF-8, but the two together spell "é": one check over the
    # joined keys must not take them for text.
    messages = [message(b"{}", offset=0, key=b"\xc3"), message(b"{}", offset=1, key=b"\xa9")]
    frame = frames(prepare(messages))["readings"]
    assert frame["kafka_key"].to_list() == ["ww==", "qQ=="]
    assert frame["kafka_key_base64"].to_list() == ["true", "true"]
    raw = frames(prepare([message(b"\xc3", offset=0), message(b"\xa9", offset=1)], "raw"))
    assert raw["readings"]["payload_text"].to_list() == [None, None]
