"""Property-based tests of the processor: silver, gold and quarantine under random arrivals.

Hypothesis generates a history of landing batches for the built-in ``readings``
source (random arrival order, exact re-sends, corrections of earlier keys, rows
days or weeks older than the newest, timestamps in every accepted spelling, and
now and then an unparseable ``ts`` or ``value``) and processes it in random
steps. The expected silver table and quarantine are computed here, from the
generated records alone; gold is checked against ``reference_gold`` (its
definition: a full recomputation from silver).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.processor import Processor
from landing_zone.formats import decode_batch
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import reference_gold

START = datetime(2026, 11, 1, tzinfo=UTC)
MINUTES = 21 * 24 * 60  # three weeks of event time, minute resolution
DEVICES = ("d0", "d1", "d2")
SENSORS = ("t", "h")
BAD_TIMESTAMPS = ("yesterday", "2026-11-31T00:00:00Z", "2026-11-05T25:00:00Z", "11/05/2026")
BAD_VALUES = ("NaN", "abc", "inf", "-Infinity", "")
GOLD_TABLES = ("readings_hourly", "readings_daily", "readings_latest")

Value = float | str


@dataclass(frozen=True)
class Record:
    """One generated reading: its key, its ``ts`` as sent, and its ``value`` as sent."""

    device_id: str
    sensor: str
    minute: int
    ts: str
    value: Value
    ts_valid: bool = True

    @property
    def value_valid(self) -> bool:
        return isinstance(self.value, float)

    @property
    def valid(self) -> bool:
        return self.ts_valid and self.value_valid

    @property
    def instant(self) -> datetime:
        return START + timedelta(minutes=self.minute)

    def as_json(self) -> dict[str, object]:
        return {
            "ts": self.ts,
            "device_id": self.device_id,
            "sensor": self.sensor,
            "value": self.value,
        }


# A step is one or more landing batches written before one ``run_once()``.
Batch = list[Record]
Step = list[Batch]


def _spellings(minute: int) -> list[str]:
    """Every accepted spelling of the same instant (all must map to the same silver key)."""
    instant = START + timedelta(minutes=minute)
    plus_two = instant.astimezone(timezone(timedelta(hours=2)))
    return [
        instant.strftime("%Y-%m-%dT%H:%M:%SZ"),
        instant.isoformat(),  # +00:00
        plus_two.isoformat(),  # +02:00, same instant
        instant.strftime("%Y-%m-%dT%H:%M:%S"),  # naive = UTC
        instant.strftime("%Y-%m-%d %H:%M:%S.000"),
        instant.strftime("%Y-%m-%dT%H:%MZ"),
        str(int(instant.timestamp() * 1000)),  # epoch milliseconds
    ]


_floats = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)


@st.composite
def _values(draw: st.DrawFn) -> Value:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(BAD_VALUES))
    return draw(_floats)


@st.composite
def _spelled(draw: st.DrawFn, minute: int) -> tuple[str, bool]:
    """``(ts as sent, parseable)`` for an instant; now and then unparseable."""
    if draw(st.integers(0, 11)) == 0:
        return draw(st.sampled_from(BAD_TIMESTAMPS)), False
    return draw(st.sampled_from(_spellings(minute))), True


@st.composite
def _history(
    draw: st.DrawFn, max_steps: int = 4, max_batches: int = 3, max_rows: int = 10
) -> list[Step]:
    """Steps of batches of records; later records re-send or correct earlier ones."""
    sent: list[Record] = []
    steps: list[Step] = []
    for _step in range(draw(st.integers(1, max_steps))):
        step: Step = []
        for _batch in range(draw(st.integers(1, max_batches))):
            batch: Batch = []
            for _row in range(draw(st.integers(1, max_rows))):
                kind = draw(st.sampled_from(["new", "new", "resend", "correct"])) if sent else "new"
                if kind == "resend":  # the very same record again
                    record = draw(st.sampled_from(sent))
                elif kind == "correct":  # same key (maybe spelled differently), new value
                    base = draw(st.sampled_from(sent))
                    ts, ts_valid = draw(_spelled(base.minute))
                    record = replace(base, ts=ts, ts_valid=ts_valid, value=draw(_values()))
                else:  # anywhere in the three weeks: often far behind the newest
                    minute = draw(st.integers(0, MINUTES - 1))
                    ts, ts_valid = draw(_spelled(minute))
                    record = Record(
                        device_id=draw(st.sampled_from(DEVICES)),
                        sensor=draw(st.sampled_from(SENSORS)),
                        minute=minute,
                        ts=ts,
                        value=draw(_values()),
                        ts_valid=ts_valid,
                    )
                batch.append(record)
                sent.append(record)
            step.append(batch)
        steps.append(step)
    return steps


# --- expectations, computed from the generated records only ------------------------------


def _expected_silver(arrived: list[Record]) -> dict[tuple[str, str, datetime], float]:
    """Key -> value of the last-arrived valid record of that key (no sequence column)."""
    latest: dict[tuple[str, str, datetime], float] = {}
    for record in arrived:
        if record.valid:
            assert isinstance(record.value, float)
            latest[(record.device_id, record.sensor, record.instant)] = record.value
    return latest


def _canonical_value(raw: object) -> tuple[str, object]:
    """A raw ``value`` as comparable data: finite numbers by value, anything else as text."""
    if isinstance(raw, float):
        return ("number", raw)
    text = str(raw)
    try:
        number = float(text)
    except ValueError:
        return ("text", text)
    return ("number", number) if math.isfinite(number) else ("text", text)


QuarantineRow = tuple[str, str, str, tuple[str, object], frozenset[str]]


def _expected_quarantine(arrived: list[Record]) -> Counter[QuarantineRow]:
    """Every arrival of an invalid record (re-sends included), with the fields at fault."""
    rows: Counter[QuarantineRow] = Counter()
    for record in arrived:
        if record.valid:
            continue
        bad = {
            name for name, ok in (("ts", record.ts_valid), ("value", record.value_valid)) if not ok
        }
        key = (record.ts, record.device_id, record.sensor, _canonical_value(record.value))
        rows[(*key, frozenset(bad))] += 1
    return rows


# --- the pipeline under test ----------------------------------------------------------------


def _settings(data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, trigger_latency_ms=0, rescan_interval_s=0.5)


def _land(settings_: Settings, batch: Batch) -> None:
    body = b"\n".join(json.dumps(r.as_json()).encode() for r in batch)
    LandingWriter(LandingLayout(settings_.data_dir)).write_frame(
        "readings", decode_batch(body, "ndjson")
    )


def _read(settings_: Settings, layer: str, name: str = "readings") -> pl.DataFrame | None:
    path = settings_.data_dir / layer / name
    return pl.read_delta(str(path)) if (path / "_delta_log").is_dir() else None


def _check_silver(settings_: Settings, arrived: list[Record]) -> pl.DataFrame:
    silver = _read(settings_, "silver")
    assert silver is not None
    expected = _expected_silver(arrived)
    rows = silver.select("device_id", "sensor", "ts", "value").rows()
    keys = [(device, sensor, ts.astimezone(UTC)) for device, sensor, ts, _value in rows]
    duplicated = [key for key, n in Counter(keys).items() if n > 1]
    assert duplicated == [], f"silver holds several rows for keys {duplicated}"
    actual = {key: row[3] for key, row in zip(keys, rows, strict=True)}
    assert actual.keys() == expected.keys()
    wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    assert wrong == {}, f"silver (actual, last-arrived) values differ: {wrong}"
    return silver


def _check_gold(settings_: Settings, silver: pl.DataFrame) -> None:
    for name, reference in reference_gold(silver).items():
        keys = [c for c in ("device_id", "sensor", "window_start") if c in reference.columns]
        gold = _read(settings_, "gold", name)
        assert gold is not None, f"gold/{name} missing"
        assert_frame_equal(gold.sort(keys), reference.sort(keys), check_exact=False)


def _check_quarantine(settings_: Settings, arrived: list[Record]) -> None:
    table = _read(settings_, "quarantine")
    actual: Counter[QuarantineRow] = Counter()
    if table is not None:
        for ts, device, sensor, value, reason in table.select(
            "ts", "device_id", "sensor", "value", "_reason"
        ).rows():
            parts = reason.split("; ")
            assert all(": cannot parse " in part for part in parts), reason
            fields = frozenset(part.split(":", 1)[0] for part in parts)
            actual[(ts, device, sensor, _canonical_value(value), fields)] += 1
    assert actual == _expected_quarantine(arrived)


def _delta_tables(data_dir: Path) -> dict[str, tuple[int, pl.DataFrame]]:
    """Every Delta table under the data directory: its version and its (sorted) rows."""
    found = {}
    for log_dir in sorted(data_dir.rglob("_delta_log")):
        root = log_dir.parent
        frame = pl.read_delta(str(root))
        found[str(root.relative_to(data_dir))] = (
            DeltaTable(str(root)).version(),
            frame.sort(frame.columns),
        )
    return found


# --- properties -------------------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(history=_history())
def test_silver_gold_and_quarantine_follow_the_arrivals(history: list[Step]) -> None:
    """(a) one silver row per key, valued by its last arrival; (b) gold = recomputation
    of silver; (c) quarantine = exactly the unparseable records, reasons naming the field.
    Checked after every ``run_once()``, whatever the split of arrivals into runs."""
    with tempfile.TemporaryDirectory() as tmp:
        settings_ = _settings(Path(tmp) / "dados")
        processor = Processor(settings_, load_contracts())
        arrived: list[Record] = []
        for step in history:
            for batch in step:
                _land(settings_, batch)
                arrived.extend(batch)
            report = processor.run_once()
            assert report.failures == []
            silver = _check_silver(settings_, arrived)
            _check_gold(settings_, silver)
            _check_quarantine(settings_, arrived)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(history=_history(max_steps=2, max_batches=2, max_rows=8))
def test_rerun_without_new_data_changes_no_table(history: list[Step]) -> None:
    """After everything is processed, further runs (same or new processor) commit nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        settings_ = _settings(Path(tmp) / "dados")
        processor = Processor(settings_, load_contracts())
        for step in history:
            for batch in step:
                _land(settings_, batch)
            assert processor.run_once().failures == []
        before = _delta_tables(settings_.data_dir)
        assert {f"gold/{name}" for name in GOLD_TABLES} <= before.keys()
        assert {"bronze/readings", "silver/readings", "quarantine/readings"} <= before.keys()

        for rerun in (processor, Processor(settings_, load_contracts())):
            report = rerun.run_once()
            assert report.failures == []
            assert not report.did_work, report
            after = _delta_tables(settings_.data_dir)
            assert after.keys() == before.keys()
            for name, (version, rows) in before.items():
                assert after[name][0] == version, f"{name} got a new version on a no-op run"
                assert_frame_equal(after[name][1], rows)


# --- bronze lineage over arbitrary raw files ------------------------------------------------

_FIELD = st.sampled_from(["a", "b", "c", "ts"])
_RAW_VALUE = st.one_of(st.none(), st.text(max_size=4), st.integers(-5, 5), st.booleans())
_RAW_RECORD = st.dictionaries(_FIELD, _RAW_VALUE, max_size=3)  # {} included


@settings(max_examples=150, deadline=None)
@given(files=st.lists(st.lists(_RAW_RECORD, min_size=1, max_size=4), min_size=1, max_size=6))
def test_bronze_lineage_keeps_every_record_in_its_own_file(
    files: list[list[dict[str, object]]],
) -> None:
    """Whatever fields the landing files hold (none included), bronze gets each file's
    records in order, each under its own file name and position, none lost or moved."""
    from delta_processing.bronze import with_lineage

    frames = [
        (decode_batch(b"\n".join(json.dumps(r).encode() for r in records), "ndjson"), f"f{n}", n)
        for n, records in enumerate(files)
    ]
    batch = with_lineage(frames, "src", START)
    expected = [(f"f{n}", row) for n, records in enumerate(files) for row in range(len(records))]
    assert batch.select("_landing_file", "_row").rows() == expected
    for frame, name, _ in frames:
        mine = batch.filter(pl.col("_landing_file") == name)
        for column in frame.columns:  # each field as its own file framed it
            assert mine[column].to_list() == frame[column].to_list(), (name, column)
        absent = [c for c in batch.columns if c not in frame.columns and not c.startswith("_")]
        for column in absent:  # fields of other files: null here
            assert mine[column].null_count() == mine.height, (name, column)
