"""Unit tests of :mod:`landing_zone.formats`: batches of every format become raw string records."""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from landing_zone.formats import (
    CONTENT_TYPES,
    BatchDecodeError,
    BatchTooLarge,
    MalformedBatch,
    UnsupportedFormat,
    concat_records,
    decode_batch,
    format_for_content_type,
    format_for_filename,
    gunzip,
    read_batch_file,
    to_raw_strings,
)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def as_ndjson(records: list[dict[str, Any]]) -> bytes:
    return "".join(compact(r) + "\n" for r in records).encode()


def as_json_array(records: list[dict[str, Any]]) -> bytes:
    return compact(records).encode()


def as_parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def assert_all_strings(frame: pl.DataFrame) -> None:
    assert frame.width > 0
    assert all(dtype == pl.String for dtype in frame.dtypes), frame.schema


def malformed(data: bytes, fmt: Any) -> MalformedBatch:
    with pytest.raises(MalformedBatch) as caught:
        decode_batch(data, fmt)
    return caught.value


# --- content types and file names -----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/JSON;charset=UTF-8", "json"),
        ("application/x-ndjson", "ndjson"),
        ("application/ndjson; charset=utf-8", "ndjson"),
        ("application/jsonl", "ndjson"),
        ("application/json-lines", "ndjson"),
        (" text/csv ; header=present", "csv"),
        ("text/csv;charset=utf-8", "csv"),
        ("application/vnd.apache.parquet", "parquet"),
        ("application/x-parquet", "parquet"),
    ],
)
def test_content_type_maps_to_format_ignoring_parameters_and_case(
    header: str, expected: str
) -> None:
    assert format_for_content_type(header) == expected


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        ("text/plain", "'text/plain'"),
        ("text/plain; charset=utf-8", "'text/plain'"),
        ("application/xml", "'application/xml'"),
        ("application/json-seq", "'application/json-seq'"),
        ("json", "'json'"),
        ("multipart/form-data; boundary=x", "'multipart/form-data'"),
        ("", "'<none>'"),
        (None, "'<none>'"),
    ],
)
def test_unknown_content_type_is_unsupported_and_lists_accepted(
    header: str | None, shown: str
) -> None:
    with pytest.raises(UnsupportedFormat) as caught:
        format_for_content_type(header)
    message = str(caught.value)
    assert shown in message
    assert all(media in message for media in CONTENT_TYPES)
    assert isinstance(caught.value, BatchDecodeError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("20240501T100000Z-abc.json", ("json", False)),
        ("batch.ndjson", ("ndjson", False)),
        ("batch.jsonl", ("ndjson", False)),
        ("batch.csv", ("csv", False)),
        ("batch.parquet", ("parquet", False)),
        ("batch.json.gz", ("json", True)),
        ("batch.ndjson.gz", ("ndjson", True)),
        ("2024.05.01.jsonl.gz", ("ndjson", True)),
        ("export.v2.csv.gz", ("csv", True)),
    ],
)
def test_file_name_maps_to_format_and_gzip_flag(name: str, expected: tuple[str, bool]) -> None:
    assert format_for_filename(name) == expected


@pytest.mark.parametrize(
    "name", ["batch.txt", "batch.gz", "batch.json.bz2", "batch.tar.gz", "json", "batch.json.tmp"]
)
def test_unknown_file_suffix_is_unsupported(name: str) -> None:
    with pytest.raises(UnsupportedFormat, match="no supported suffix"):
        format_for_filename(name)


# --- gzip -------------------------------------------------------------------------------------


def test_gunzip_round_trips_and_the_limit_is_inclusive() -> None:
    payload = as_ndjson([{"i": i} for i in range(100)])
    packed = gzip.compress(payload)
    assert gunzip(packed, len(payload)) == payload
    with pytest.raises(BatchTooLarge, match=f"limit of {len(payload) - 1} bytes"):
        gunzip(packed, len(payload) - 1)


def test_gunzip_stops_a_bomb_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 128 * 1024
    with pytest.raises(BatchTooLarge):
        gunzip(bomb, 1024 * 1024)


def test_gunzip_reads_every_member_of_concatenated_gzip() -> None:
    # `cat a.ndjson.gz b.ndjson.gz` is valid gzip; stopping at the first member lost records.
    first, second = as_ndjson([{"i": 1}]), as_ndjson([{"i": 2}, {"i": 3}])
    joined = gzip.compress(first) + gzip.compress(second)
    assert gunzip(joined, 1000) == first + second
    assert decode_batch(gunzip(joined, 1000), "ndjson")["i"].to_list() == ["1", "2", "3"]
    with pytest.raises(BatchTooLarge):  # the limit covers all members together
        gunzip(joined, len(first + second) - 1)


def test_truncated_gzip_is_malformed_wherever_it_is_cut() -> None:
    packed = gzip.compress(as_ndjson([{"i": i, "s": "x" * i} for i in range(200)]))
    for cut in (0, 5, 10, len(packed) // 2, len(packed) - 8, len(packed) - 1):
        with pytest.raises(MalformedBatch) as caught:
            gunzip(packed[:cut], 10**7)
        assert "truncated gzip stream" in str(caught.value) or "invalid gzip" in str(caught.value)
    with pytest.raises(MalformedBatch, match="truncated gzip stream"):
        gunzip(packed[: len(packed) // 2], 10**7)


def test_corrupt_gzip_is_malformed() -> None:
    packed = bytearray(gzip.compress(b'{"i": 1}\n' * 50))
    packed[-8] ^= 0xFF  # CRC32 of the trailer
    with pytest.raises(MalformedBatch, match="invalid gzip data"):
        gunzip(bytes(packed), 10**6)
    with pytest.raises(MalformedBatch, match="invalid gzip data"):
        gunzip(b'{"i": 1}\n', 10**6)
    with pytest.raises(MalformedBatch, match="invalid gzip data"):
        gunzip(gzip.compress(b'{"i": 1}\n') + b"trailing junk", 10**6)


def test_read_batch_file_gunzips_by_suffix() -> None:
    records = [{"device_id": "d1", "value": 1.5}, {"device_id": "d2", "value": 2}]
    plain = read_batch_file(as_ndjson(records), "b.ndjson", 10**6)
    zipped = read_batch_file(gzip.compress(as_ndjson(records)), "b.ndjson.gz", 10**6)
    assert_frame_equal(plain, zipped)
    assert plain["device_id"].to_list() == ["d1", "d2"]
    with pytest.raises(BatchTooLarge):
        read_batch_file(gzip.compress(b" " * 2000 + as_ndjson(records)), "b.ndjson.gz", 1000)
    with pytest.raises(UnsupportedFormat):
        read_batch_file(as_ndjson(records), "b.xml", 10**6)


# --- decoding: every format gives raw strings ---------------------------------------------------

RECORD = {
    "i": 1,
    "neg": -3,
    "f": 2.5,
    "f_whole": 1.0,
    "big": 12345678901234567890,
    "t": True,
    "fa": False,
    "n": None,
    "s": 'café ☃, "quoted"',
    "o": {"a": 1, "b": [1, 2], "c": {"d": None}},
    "l": [1, 2, 3],
    "ls": ["a", "b"],
    "empty_list": [],
}
RAW = {
    "i": "1",
    "neg": "-3",
    "f": "2.5",
    "f_whole": "1.0",
    "big": "12345678901234567890",
    "t": "true",
    "fa": "false",
    "n": None,
    "s": 'café ☃, "quoted"',
    "o": '{"a":1,"b":[1,2],"c":{"d":null}}',
    "l": "[1,2,3]",
    "ls": '["a","b"]',
    "empty_list": "[]",
}


@pytest.mark.parametrize(
    ("fmt", "body"),
    [
        ("json", as_json_array([RECORD])),
        ("json", compact(RECORD).encode()),  # a bare object is a batch of one
        ("json", json.dumps(RECORD, indent=2).encode()),
        ("ndjson", as_ndjson([RECORD])),
        ("ndjson", json.dumps(RECORD).encode()),  # no final newline, spaces after separators
    ],
)
def test_json_values_become_their_json_spelling(fmt: Any, body: bytes) -> None:
    frame = decode_batch(body, fmt)
    assert_all_strings(frame)
    assert frame.rows(named=True) == [RAW]


def test_json_records_with_different_fields_are_aligned_with_nulls() -> None:
    records = [{"a": 1}, {"b": "x"}, {"a": 3, "c": True}]
    for frame in (
        decode_batch(as_json_array(records), "json"),
        decode_batch(as_ndjson(records), "ndjson"),
    ):
        assert_all_strings(frame)
        assert sorted(frame.columns) == ["a", "b", "c"]
        rows = frame.select("a", "b", "c").rows()
        assert rows == [("1", None, None), (None, "x", None), ("3", None, "true")]


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
@pytest.mark.parametrize(
    "mixed",
    [
        [1, {"a": 2}],
        [1, "a", None, True, [2], {"k": "v"}],
        [{"a": 1}, [1, [2, {"b": None}]]],
        [True, 1, 2.5],
    ],
    ids=["number-object", "every-kind", "object-nested-list", "bool-int-float"],
)
def test_mixed_type_arrays_are_accepted(fmt: Any, mixed: list[Any]) -> None:
    records = [{"id": "r1", "m": mixed}, {"id": "r2", "m": None}]
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    assert_all_strings(frame)
    assert frame["id"].to_list() == ["r1", "r2"]
    assert frame["m"][1] is None
    assert isinstance(json.loads(frame["m"][0]), list)


def test_mixed_type_array_keeps_its_exact_json_text() -> None:
    frame = decode_batch(as_json_array([{"m": [1, {"a": 2}]}]), "json")
    assert frame["m"].to_list() == ['[1,{"a":2}]']


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_a_column_mixing_json_kinds_keeps_each_value(fmt: Any) -> None:
    values = [1, "a", {"k": 1}, [1, 2], True, None, False, 2.5]
    records = [{"x": v} for v in values]
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    assert_all_strings(frame)
    cells = frame["x"].to_list()
    assert cells[1] == "a" and cells[5] is None
    assert cells[4] == "true" and cells[6] == "false"  # booleans stay booleans
    assert [json.loads(c) for i, c in enumerate(cells) if i not in (1, 5)] == [
        v for i, v in enumerate(values) if i not in (1, 5)
    ]


@pytest.mark.parametrize(
    "records",
    [
        [{"ok": True}, {"ok": 1}],
        [{"ok": 1}, {"ok": False}],
        [{"ok": 1.5}, {"ok": True}],
        [{"flag": [1]}, {"flag": [True]}],
        [{"ok": True, "v": 1}, {"ok": 2, "v": 2}],
    ],
)
def test_booleans_are_never_turned_into_numbers(records: list[dict[str, Any]]) -> None:
    """Regression: read_json turned `true` into `1` when a column also held numbers."""
    from_json = decode_batch(as_json_array(records), "json")
    from_ndjson = decode_batch(as_ndjson(records), "ndjson")
    assert_frame_equal(from_json, from_ndjson, check_column_order=False)
    for row, record in zip(from_json.rows(named=True), records, strict=True):
        assert {k: json.loads(v) for k, v in row.items()} == record
        for key, value in record.items():
            if isinstance(value, bool):
                assert row[key] == compact(value)


def test_booleans_fast_path_still_used_for_plain_boolean_columns() -> None:
    records = [{"ok": True, "v": 1.5, "note": "fine"}, {"ok": False, "v": 2.5, "note": None}]
    frame = decode_batch(as_json_array(records), "json")
    assert frame.rows() == [("true", "1.5", "fine"), ("false", "2.5", None)]


def test_csv_cells_stay_text_exactly_as_sent() -> None:
    body = (
        b"device_id,value,code,flag,note\r\n"
        b'd1,1.50,007,true,"a, b"\r\n'
        b'd2,,1e3,FALSE,"line1\nline2"\r\n'
        b'd3,-0,,0,""\r\n'
    )
    frame = decode_batch(body, "csv")
    assert_all_strings(frame)
    assert frame.rows() == [
        ("d1", "1.50", "007", "true", "a, b"),  # no type inference: 1.50 and 007 survive
        ("d2", None, "1e3", "FALSE", "line1\nline2"),
        ("d3", "-0", None, "0", ""),  # unquoted empty is null, quoted empty is ""
    ]


def test_parquet_columns_become_raw_strings() -> None:
    typed = pl.DataFrame(
        {
            "ts": [datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC), None],
            "device_id": ["d1", "d2"],
            "value": [1.5, -2.0],
            "count": [3, None],
            "ok": [True, False],
        }
    )
    frame = decode_batch(as_parquet(typed), "parquet")
    assert_all_strings(frame)
    assert frame.columns == typed.columns
    assert frame.rows() == [
        ("2024-05-01T10:00:00.250+00:00", "d1", "1.5", "3", "true"),
        (None, "d2", "-2.0", None, "false"),
    ]


# --- decoding errors name the line or the record --------------------------------------------------


def test_ndjson_error_names_the_line() -> None:
    good = as_ndjson([{"a": 1}, {"a": 2}])
    error = malformed(good + b'{"a": \n' + as_ndjson([{"a": 4}]), "ndjson")
    assert error.line == 3 and error.record is None
    assert str(error).startswith("line 3: invalid JSON")
    # Blank lines count: they are lines of the body the sender can look at.
    error = malformed(b'{"a": 1}\n\n\n{"a": 1} trailing\n', "ndjson")
    assert error.line == 4
    assert "column 10" in str(error)


@pytest.mark.parametrize(
    ("line", "kind"),
    [(b"[1, 2]", "list"), (b"42", "int"), (b'"text"', "str"), (b"null", "null"), (b"true", "bool")],
)
def test_ndjson_line_that_is_not_an_object(line: bytes, kind: str) -> None:
    error = malformed(b'{"a": 1}\n' + line + b"\n", "ndjson")
    assert error.line == 2
    assert str(error) == f"line 2: expected a JSON object, got {kind}"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_ndjson_rejects_non_finite_constants(constant: bytes) -> None:
    error = malformed(b'{"v": 1}\n{"v": ' + constant + b"}\n", "ndjson")
    assert error.line == 2
    assert f"{constant.decode()} is not valid JSON" in str(error)


def test_invalid_utf8_names_the_line() -> None:
    error = malformed(b'{"a": "ok"}\n{"a": "caf\xe9"}\n', "ndjson")
    assert error.line == 2 and "invalid UTF-8 at byte" in str(error)
    error = malformed(b'[{"a": "caf\xe9"}]', "json")
    assert "invalid UTF-8" in str(error)
    error = malformed(b"a,b\n1,2\n\xff\xfe,3\n", "csv")
    assert error.line == 3 and "invalid UTF-8" in str(error)


def test_json_array_error_names_the_record() -> None:
    error = malformed(as_json_array([{"a": 1}, {"a": 2}]).replace(b"]", b',"x"]'), "json")
    assert error.record == 3 and error.line is None
    assert str(error) == "record 3: expected a JSON object, got str"
    error = malformed(b'[{"a": 1}, null]', "json")
    assert error.record == 2 and "got null" in str(error)


def test_json_syntax_error_names_the_line() -> None:
    body = b'[\n  {"a": 1},\n  {"a": 2},\n  {"a": }\n]'
    error = malformed(body, "json")
    assert error.line == 4 and str(error).startswith("line 4: invalid JSON")


@pytest.mark.parametrize("body", [b"42", b'"text"', b"null", b"true", b"[[1]]"])
def test_json_must_be_an_object_or_array_of_objects(body: bytes) -> None:
    error = malformed(body, "json")
    assert "expected a JSON object" in str(error)


def test_json_nan_and_deep_nesting_are_malformed_not_crashes() -> None:
    assert "NaN is not valid JSON" in str(malformed(b'[{"v": NaN}]', "json"))
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "invalid JSON" in str(malformed(deep, "json"))
    assert malformed(deep, "ndjson").line == 1


@pytest.mark.parametrize(
    ("body", "line", "found"),
    [
        (b"a,b\n1,2\n3\n", 3, 1),
        (b"a,b\n1,2\n3,4,5\n", 3, 3),
        (b"a,b\r\n1,2\r\n3,4\r\n5\r\n", 4, 1),
        (b'a,b\n"multi\nline",2\n3\n', 4, 1),  # the quoted newline is a line of its own
        (b"a,b\n1,2\n\n3\n", 4, 1),  # blank lines are not rows but still lines
    ],
)
def test_ragged_csv_names_the_line(body: bytes, line: int, found: int) -> None:
    """Regression: Polars padded short rows with nulls, silently shifting no values."""
    error = malformed(body, "csv")
    assert error.line == line
    assert f"expected 2 fields as in the header, found {found}" in str(error)


def test_csv_with_empty_last_fields_is_not_ragged() -> None:
    frame = decode_batch(b"a,b,c\n1,,\n,,\n2,3,\n", "csv")
    assert frame.rows() == [("1", None, None), (None, None, None), ("2", "3", None)]


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
@pytest.mark.parametrize("body", [b"", b"   ", b"\n\n\r\n"])
def test_empty_text_bodies_are_malformed(fmt: Any, body: bytes) -> None:
    assert "empty body" in str(malformed(body, fmt))


@pytest.mark.parametrize(
    "body", [b"", b"PAR1", b"PAR1" + b"\0" * 64 + b"PAR1", b'{"a": 1}', b"a,b\n1,2\n"]
)
def test_garbage_parquet_is_malformed(body: bytes) -> None:
    assert str(malformed(body, "parquet")).startswith("invalid Parquet")


def test_parquet_with_nested_binary_is_malformed_not_a_crash() -> None:
    """Regression: Polars panicked (a BaseException) writing nested binary as JSON."""
    frame = pl.DataFrame({"id": ["a"], "blobs": [[b"\x00\x01"]]})
    error = malformed(as_parquet(frame), "parquet")
    assert "'blobs'" in str(error) and "binary" in str(error)


def test_empty_frames_decode_to_zero_rows() -> None:
    assert decode_batch(b"[]", "json").height == 0
    assert decode_batch(b"a,b\n", "csv").shape == (0, 2)
    empty = pl.DataFrame({"a": []}, schema={"a": pl.Int64})
    assert decode_batch(as_parquet(empty), "parquet").schema == pl.Schema({"a": pl.String})


# --- to_raw_strings on typed frames ---------------------------------------------------------------


def test_to_raw_strings_datetimes_are_iso_with_offset_when_zoned() -> None:
    instant = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "utc": [instant, None],
            "lisbon": [instant, instant],
            "kolkata": [instant, instant],
            "naive": [datetime(2024, 5, 1, 10, 0), datetime(2024, 5, 1, 10, 0, 0, 500000)],
        }
    ).with_columns(
        pl.col("lisbon").dt.convert_time_zone("Europe/Lisbon"),
        pl.col("kolkata").dt.convert_time_zone("Asia/Kolkata").dt.cast_time_unit("ms"),
    )
    raw = to_raw_strings(frame)
    assert_all_strings(raw)
    assert raw.row(0) == (
        "2024-05-01T10:00:00.123456+00:00",
        "2024-05-01T11:00:00.123456+01:00",
        "2024-05-01T15:30:00.123+05:30",
        "2024-05-01T10:00:00",
    )
    assert raw["utc"][1] is None and raw["naive"][1] == "2024-05-01T10:00:00.500"
    # Every zoned string parses back to the same instant.
    for column in ("lisbon", "kolkata"):
        parsed = datetime.fromisoformat(raw[column][0])
        assert parsed.utcoffset() is not None
        assert abs(parsed - instant) < timedelta(milliseconds=1)
    assert datetime.fromisoformat(raw["utc"][0]) == instant
    assert datetime.fromisoformat(raw["lisbon"][0]).tzinfo == timezone(timedelta(hours=1))


def test_to_raw_strings_binary_is_base64() -> None:
    blobs = [b"\x00\xff\x10binary", b"", None]
    raw = to_raw_strings(pl.DataFrame({"blob": blobs}, schema={"blob": pl.Binary}))
    assert raw["blob"].to_list() == ["AP8QYmluYXJ5", "", None]
    assert base64.b64decode(raw["blob"][0]) == blobs[0]


def test_to_raw_strings_lists_and_structs_are_compact_json() -> None:
    frame = pl.DataFrame(
        {
            "ints": [[1, 2], [], None],
            "strs": [["a", None], ['é "q"'], None],
            "nested": [[[1], [2, 3]], None, [[]]],
            "structs": [{"a": 1, "b": "x"}, None, {"a": None, "b": "y"}],
            "list_of_structs": [[{"k": 1}], None, []],
            "array": pl.Series([[1, 2], [3, 4], None], dtype=pl.Array(pl.Int64, 2)),
        }
    )
    raw = to_raw_strings(frame)
    assert_all_strings(raw)
    assert raw.to_dict(as_series=False) == {
        "ints": ["[1,2]", "[]", None],
        "strs": ['["a",null]', '["é \\"q\\""]', None],
        "nested": ["[[1],[2,3]]", None, "[[]]"],
        # A null struct is a null cell, like a null list (regression: it was the text "null").
        "structs": ['{"a":1,"b":"x"}', None, '{"a":null,"b":"y"}'],
        "list_of_structs": ['[{"k":1}]', None, "[]"],
        "array": ["[1,2]", "[3,4]", None],
    }
    for value in raw["strs"].drop_nulls():
        json.loads(value)


def test_to_raw_strings_scalars() -> None:
    frame = pl.DataFrame(
        {
            "b": [True, None],
            "i8": pl.Series([-1, 2], dtype=pl.Int8),
            "u64": pl.Series([2**64 - 1, 0], dtype=pl.UInt64),
            "f": [2.5, float("nan")],
            "d": [date(2024, 5, 1), None],
            "dec": pl.Series([Decimal("1.50"), Decimal("-0.25")], dtype=pl.Decimal(10, 2)),
            "cat": pl.Series(["x", "y"], dtype=pl.Categorical),
            "dur": [timedelta(minutes=1, seconds=30), None],
            "s": ["plain", None],
        }
    )
    raw = to_raw_strings(frame)
    assert_all_strings(raw)
    assert raw.rows() == [
        (
            "true",
            "-1",
            "18446744073709551615",
            "2.5",
            "2024-05-01",
            "1.50",
            "x",
            "PT1M30S",
            "plain",
        ),
        (None, "2", "0", "NaN", None, "-0.25", "y", None, None),
    ]


def test_parquet_decoding_equals_to_raw_strings_of_the_written_frame() -> None:
    frame = pl.DataFrame(
        {
            "ts": [datetime(2024, 5, 1, tzinfo=UTC)],
            "dur": [timedelta(seconds=5)],
            "blob": [b"\x01"],
            "tags": [["a", "b"]],
            "meta": [{"fw": "1.2", "rssi": -70}],
        }
    )
    assert_frame_equal(decode_batch(as_parquet(frame), "parquet"), to_raw_strings(frame))


# --- property: every JSON encoding of the same records decodes alike ------------------------


def random_records(seed: int, count: int) -> list[dict[str, Any]]:
    """Sensor-like records: optional fields, nulls, nested values, awkward strings."""
    rng = random.Random(seed)
    alphabet = 'ab,"\n\\é☃ 01{}[]:'

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))

    def number() -> float:
        return rng.choice(
            [round(rng.uniform(-1e4, 1e4), rng.randint(1, 6)), 0.5, -0.0, 1e-7, 1.5e300]
        )

    fields = {
        "device_id": text,
        "seq": lambda: rng.choice([rng.randint(-(2**40), 2**40), 0, 2**63 - 1]),
        "value": lambda: None if rng.random() < 0.1 else number(),
        "ok": lambda: rng.choice([True, False, None]),
        "tags": lambda: [text() for _ in range(rng.randint(0, 3))],
        "meta": lambda: {"fw": text(), "rssi": rng.randint(-100, 0), "pos": [number(), number()]},
        "matrix": lambda: [
            [rng.randint(-9, 9) for _ in range(2)] for _ in range(rng.randint(0, 2))
        ],
        "note": lambda: rng.choice([None, text()]),
    }
    records = []
    for _ in range(count):
        present = [name for name in fields if name == "device_id" or rng.random() < 0.8]
        records.append({name: fields[name]() for name in present})
    return records


def semantic(row: dict[str, str | None]) -> dict[str, object]:
    """A decoded row with every JSON-looking cell parsed, strings kept as they are."""
    parsed: dict[str, object] = {}
    for name, cell in row.items():
        try:
            parsed[name] = json.loads(cell) if cell is not None else None
        except json.JSONDecodeError:
            parsed[name] = cell
    return parsed


@pytest.mark.parametrize("seed", range(25))
def test_ndjson_and_json_array_decode_to_the_same_frame(seed: int) -> None:
    records = random_records(seed, count=1 + seed * 7)
    from_ndjson = decode_batch(as_ndjson(records), "ndjson")
    from_array = decode_batch(as_json_array(records), "json")
    # Same meaning cell by cell (number spellings such as 1e-7 / 1e-07 may differ).
    assert sorted(from_ndjson.columns) == sorted(from_array.columns)
    assert [semantic(r) for r in from_ndjson.rows(named=True)] == [
        semantic(r) for r in from_array.rows(named=True)
    ]
    assert_all_strings(from_ndjson)
    assert from_ndjson.height == len(records)
    # And every cell is the JSON text of what was sent (strings as themselves).
    for row, record in zip(from_ndjson.rows(named=True), records, strict=True):
        for name, cell in row.items():
            sent = record.get(name)
            if sent is None or isinstance(sent, str):
                assert cell == sent, (name, cell, sent)
            else:
                assert json.loads(cell) == sent, (name, cell, sent)
    # Whitespace and gzip do not change the outcome.
    spaced = b"".join(json.dumps(r).encode() + b"\r\n" for r in records)
    assert_frame_equal(decode_batch(spaced, "ndjson"), from_ndjson)
    zipped = gunzip(gzip.compress(as_json_array(records)), 10**7)
    assert_frame_equal(decode_batch(zipped, "json"), from_array)


@pytest.mark.parametrize(
    ("fmt", "records"),
    [
        ("json", [{"m": [1, "a"]}]),
        ("ndjson", [{"m": [1, "a"]}]),
        ("ndjson", [{"m": [1, {"a": 2}]}]),
        ("json", [{"m": [[1], "a"]}]),
        ("json", [{"m": {"k": [1, "a"]}}]),
        ("ndjson", [{"o": {"a": 1}}, {"o": {"b": 2}}]),
        ("json", [{"o": {"a": 1}}, {"o": {"b": 2}}]),
        ("ndjson", [{"o": {"a": 1}}, {"o": {"a": 2, "b": None}}]),
        ("ndjson", [{"m": ['a"b', 1]}, {"m": ["c"]}]),
        ("ndjson", [{"m": [True, "x"]}]),
        ("json", [{"m": [[1, 2], [3.5]]}, {"m": None}]),
    ],
)
def test_nested_values_of_mixed_kinds_keep_their_meaning(
    fmt: Any, records: list[dict[str, Any]]
) -> None:
    """Polars' type unification would rewrite them (``[1, "a"]`` -> ``["1", "a"]``,
    missing object keys -> null): such bodies take the exact path."""
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    decoded = [
        {k: None if v is None else json.loads(v) for k, v in row.items()}
        for row in frame.rows(named=True)
    ]
    assert decoded == records


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_nested_values_unification_leaves_alone_stay_on_the_fast_path(
    fmt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consistent nested values are not sent to the (much slower) exact path."""
    import landing_zone.formats as formats

    def refuse(records: object) -> object:
        raise AssertionError("took the exact path")

    monkeypatch.setattr(formats, "raw_frame", refuse)  # what the exact path frames with
    records = [
        {"m": [1, 2], "o": {"a": 1, "b": "x"}, "t": ["a", 'q"b']},
        {"m": [3], "o": {"a": 2, "b": None}, "t": []},
    ]
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    assert frame["m"].to_list() == ["[1,2]", "[3]"]
    assert frame["o"].to_list() == ['{"a":1,"b":"x"}', '{"a":2,"b":null}']
    assert [json.loads(v) for v in frame["t"].to_list()] == [["a", 'q"b'], []]


def test_gzip_of_each_text_format_decodes_like_the_plain_body() -> None:
    records = random_records(99, 40)
    for fmt, body in (("ndjson", as_ndjson(records)), ("json", as_json_array(records))):
        inflated = gunzip(gzip.compress(body), len(body))
        assert inflated == body
        assert_frame_equal(decode_batch(inflated, fmt), decode_batch(body, fmt))


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_long_integers_beside_floats_keep_every_digit(fmt: Any) -> None:
    records = [{"id": 9007199254740993, "v": 1}, {"id": 1.5, "v": 2.5}]
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    assert frame["id"].to_list() == ["9007199254740993", "1.5"]


@pytest.mark.parametrize(
    "records",
    [
        [{"m": [9007199254740993, 1.5]}],
        [{"m": {"a": 9007199254740993}}, {"m": {"a": 0.5}}],
        [{"m": [[9007199254740993], [0.5]]}],
        [{"m": [{"a": [-9007199254740993]}, {"a": [0.5]}]}],
    ],
)
@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_long_integers_beside_floats_inside_arrays_and_objects_keep_every_digit(
    fmt: Any, records: list[dict[str, Any]]
) -> None:
    body = as_json_array(records) if fmt == "json" else as_ndjson(records)
    frame = decode_batch(body, fmt)
    assert [json.loads(v) for v in frame["m"].to_list()] == [r["m"] for r in records]


@pytest.mark.parametrize(
    ("body", "fmt"),
    [
        (b"{}", "json"),
        (b" {} ", "ndjson"),
        (b"[{}]", "json"),
        (b"{}\n{}", "ndjson"),
        (b"[{}, {}, {}]", "json"),
    ],
)
def test_records_without_fields_are_records(body: bytes, fmt: Any) -> None:
    expected = body.count(b"{}")
    assert decode_batch(body, fmt).shape == (expected, 0)


def test_concat_records_keeps_rows_of_frames_without_columns() -> None:
    frames = [
        pl.DataFrame({"b": ["1"]}),
        decode_batch(b"{}\n{}", "ndjson"),
        pl.DataFrame({"a": ["2"], "b": [None]}),
    ]
    merged = concat_records(frames)
    assert merged.columns == ["b", "a"]
    assert merged.rows() == [("1", None), (None, None), (None, None), (None, "2")]
    assert concat_records(frames[1:2]).shape == (2, 0)
    assert concat_records([frames[1], frames[1]]).shape == (4, 0)
