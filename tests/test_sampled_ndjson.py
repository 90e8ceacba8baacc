"""NDJSON typed from a sample (landing_zone.sampled_ndjson) decodes exactly as full inference.

The property: with the sampled path on, :func:`decode_batch` and
:func:`decode_for_landing` give exactly what the full path (sampled path off) gives,
or the same error; bodies are built to hit every way a late line can differ from
the first ones. The size thresholds are lowered so that small bodies take the path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from landing_zone import sampled_ndjson
from landing_zone.formats import MalformedBatch, decode_batch, decode_for_landing

KEYS = ["ts", "device_id", "value", "ok", "n", "a\u00e9"]


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sampled_ndjson, "MIN_BYTES", 0)
    monkeypatch.setattr(sampled_ndjson, "SAMPLE_BYTES", 200)  # a few lines
    yield


def _full(body: bytes) -> pl.DataFrame | str:
    """What decode_batch made before the sampled path existed (or its error)."""
    saved = sampled_ndjson.MIN_BYTES
    sampled_ndjson.MIN_BYTES = 1 << 62
    try:
        return decode_batch(body, "ndjson")
    except MalformedBatch as exc:
        return str(exc)
    finally:
        sampled_ndjson.MIN_BYTES = saved


def _outcome(decode: Any, body: bytes) -> pl.DataFrame | str:
    try:
        result = decode(body, "ndjson")
    except MalformedBatch as exc:
        return str(exc)
    if isinstance(result, pa.Table):
        result = pl.from_arrow(result)
    assert isinstance(result, pl.DataFrame)
    return result


def _assert_same(body: bytes) -> None:
    expected = _full(body)
    for decode in (decode_batch, decode_for_landing):
        got = _outcome(decode, body)
        if isinstance(expected, str) or isinstance(got, str):
            assert got == expected, body
        else:
            assert_frame_equal(got, expected)


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**53 - 3, max_value=2**53 + 3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=2),
)


@st.composite
def lines(draw: st.DrawFn) -> str:
    """One NDJSON line: mostly an object of a stable shape, sometimes anything odd."""
    kind = draw(st.sampled_from(["stable"] * 6 + ["free", "raw"]))
    if kind == "stable":
        record = {
            "ts": draw(st.text(min_size=1, max_size=4)),
            "device_id": draw(st.sampled_from(["d1", "d2", None])),
            "value": draw(
                st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5))
            ),
        }
        return json.dumps(record, ensure_ascii=draw(st.booleans()))
    if kind == "free":
        record = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
        return json.dumps(record, ensure_ascii=False)
    return draw(
        st.sampled_from(
            [
                "",
                "   ",
                "null",
                "5",
                "[1]",
                '{"value":NaN}',
                '{"value":Infinity}',
                '{"value":-Infinity}',
                '{"value":1e400}',
                '{"ts":"x"}{"ts":"y"}',
                '{"ts":"x"} {"ts":"y"}',
                '{"ts":"a","ts":"b"}',
                '{"ts":"x","extra":1}',
                '{"ts":"\\ud800"}',
                '{"ts":"x\\u0000y"}',
                '{"a\\u0000b":1}',
                '{"ts":',
                '{"value":01}',
                '{"value":-0}',
                '{"value":-0.0}',
                '{"value":1E2}',
                '{"ok":true}',
                '{"n":9223372036854775808}',
                '{"ts":"x"}\r',
            ]
        )
    )


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=st.lists(lines(), min_size=1, max_size=40), trailing=st.booleans())
def test_sampled_path_decodes_exactly_as_full_inference(
    small_thresholds: None, body: list[str], trailing: bool
) -> None:
    text = "\n".join(body) + ("\n" if trailing else "")
    if not text.strip():
        return
    _assert_same(text.encode())


def test_a_stable_body_takes_the_sampled_path_and_matches(small_thresholds: None) -> None:
    rows = [
        {"ts": f"2026-11-20T00:{i % 60:02d}:00Z", "device_id": f"d{i % 3}", "value": i / 4}
        for i in range(200)
    ]
    rows[150]["value"] = 7  # an integer among floats stays 7.0, as full inference has it
    rows[160]["device_id"] = None
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert isinstance(decode_for_landing(body, "ndjson"), pa.Table)  # the sampled path
    _assert_same(body)
    assert decode_batch(body, "ndjson")["value"][150] == "7.0"


@pytest.mark.parametrize(
    "late",
    [
        '{"ts":"x","value":1.5,"new":1}',  # a key the sample lacks
        '{"ts":5,"value":1.5}',  # a number in a string column
        '{"ts":"x","value":"1.5"}',  # a string in a float column
        '{"ts":"x","value":true}',  # a boolean in a float column
        '{"ts":"x","value":NaN}',  # not JSON: a 400 naming the line
        '{"ts":"x","value":12345678901234567890}',  # past 2**53 in a float column
        '{"ts":"x"}{"ts":"y"}',  # two objects on a line
    ],
)
def test_late_lines_that_differ_fall_back_to_the_full_path(
    small_thresholds: None, late: str
) -> None:
    first = "".join(json.dumps({"ts": f"t{i}", "value": i + 0.5}) + "\n" for i in range(50))
    body = (first + late + "\n").encode()
    _assert_same(body)
    try:
        landed = decode_for_landing(body, "ndjson")
    except MalformedBatch:
        return  # refused, with the full path's message (checked above)
    assert isinstance(landed, pl.DataFrame)  # the full path answered


def test_key_orders_and_subsets_keep_the_full_paths_column_order(
    small_thresholds: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Later lines with the sample's keys in other orders, or fewer of them."""
    taken = []
    original = sampled_ndjson.read_sampled_raw

    def counting(data: bytes) -> pa.Table | None:
        table = original(data)
        taken.append(table is not None)
        return table

    monkeypatch.setattr("landing_zone.formats.read_sampled_raw", counting)
    rng = random.Random(7)
    values = {"a": 1.5, "b": "x", "c": 2, "d": True}
    for _ in range(300):
        rows = [{k: values[k] for k in rng.sample(list(values), 4)}]
        rows += [
            {k: values[k] for k in rng.sample(list(values), rng.randint(1, 4))} for _ in range(8)
        ]
        _assert_same("".join(json.dumps(r) + "\n" for r in rows).encode())
    assert sum(taken) >= 300  # the sampled path answered (not only the full one)
