"""The shortcuts of the hot path give the same tables as the general path they skip.

- Typing: :func:`first_parse` (one candidate spelling at a time) equals ``pl.coalesce``.
- Silver: a batch of new keys is appended, a batch touching stored keys is merged.
- Silver takes the rows bronze just appended instead of reading them back through
  the change feed.
- Gold latest: the newer of the stored and the changed rows, recomputing only groups
  that lost rows, or every touched group when a group may hold two rows per instant.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import delta_processing.gold as gold_module
from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.bronze import BronzeIngestor, BronzeLimits
from delta_processing.coercions import (
    date_candidates,
    first_parse,
    general_timestamp_candidates,
    parse_date,
    parse_timestamp,
    timestamp_candidates,
)
from delta_processing.crashpoints import CrashPoints
from delta_processing.gold import gold_frame, latest_schema, latest_values
from delta_processing.processor import Processor
from delta_processing.silver import SilverInserts, SilverPromoter, with_arrival
from delta_processing.tables import TableStore, as_inserts, ensure_table, read_changes
from landing_zone.layout import LandingLayout
from tests.helpers import count_change_feed_reads, land_records

SPELLINGS = [
    "2026-11-20T00:00:00Z",
    "2026-11-20 01:02:03.5+02:00",
    "2026-11-20T01:02",
    "2026-11-20T05:06+0100",
    "2026-11-20T01:02:03.123456",
    "  2026-11-20T00:00:00+01:00 ",
    "2026-11-20",
    "1700000000000",
    "1.5e12",
    "-5",
    "NaN",
    "junk",
    "",
]


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(SPELLINGS), st.text(max_size=12))))
def test_first_parse_equals_coalescing_every_spelling(values: list[str | None]) -> None:
    raw = pl.DataFrame({"v": values}, schema={"v": pl.String})
    utc = pl.Datetime("us", "UTC")
    expected = raw.select(parse_timestamp(pl.col("v")).cast(utc)).to_series()
    assert first_parse(raw, timestamp_candidates(pl.col("v")), utc).equals(expected)
    expected_dates = raw.select(parse_date(pl.col("v"))).to_series()
    assert first_parse(raw, date_candidates(pl.col("v")), pl.Date()).equals(expected_dates)


_ZULU_PARTS = st.tuples(
    st.sampled_from(["", " ", "+", "-", "0", "12"]),
    st.sampled_from(["2026", "0000", "9999", "1970", "26"]),
    st.sampled_from(["-11-20", "-1-2", "-02-30", "-13-01", "-12-31"]),
    st.sampled_from(["T", " ", "t"]),
    st.sampled_from(["00:00:00", "23:59:60", "24:00:00", "0:0:0", "12:34", "23:59:59"]),
    st.sampled_from(["", ".", ".1", ".123456", ".1234567", ".123456789", ".0000000000001"]),
    st.sampled_from(["Z", "z", "Z ", "", "+00:00", "ZZ"]),
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.lists(_ZULU_PARTS.map("".join), min_size=1, max_size=8))
def test_the_zulu_fast_path_only_changes_speed(values: list[str]) -> None:
    """Whatever the fast ``...Z`` parse accepts, the general spellings read the same."""
    raw = pl.DataFrame({"v": values}, schema={"v": pl.String})
    fast = raw.select(parse_timestamp(pl.col("v"))).to_series()
    general = raw.select(pl.coalesce(general_timestamp_candidates(pl.col("v")))).to_series()
    assert fast.cast(pl.Int64).to_list() == general.cast(pl.Int64).to_list(), values


def _reading(minute: int, value: float, device: str = "d1") -> dict[str, object]:
    ts = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(minutes=minute)
    return {"ts": ts.isoformat(), "device_id": device, "sensor": "t", "value": value}


def _operations(path: Path) -> list[str]:
    history = DeltaTable(str(path)).history()
    return [str(entry["operation"]) for entry in sorted(history, key=lambda e: e["version"])]


def test_new_keys_are_appended_and_stored_keys_merged(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    land_records(settings.data_dir, "readings", [_reading(1, 1.0), _reading(2, 2.0)])
    processor.run_once()
    land_records(settings.data_dir, "readings", [_reading(3, 3.0)])
    processor.run_once()
    land_records(settings.data_dir, "readings", [_reading(2, 20.0), _reading(4, 4.0)])
    processor.run_once()

    silver_path = settings.data_dir / "silver" / "readings"
    operations = _operations(silver_path)
    assert operations[-3:] == ["WRITE", "WRITE", "MERGE"]
    silver = pl.read_delta(str(silver_path)).sort("ts")
    assert silver["value"].to_list() == [1.0, 20.0, 3.0, 4.0]  # the re-sent key replaced


def _latest(settings: Settings, name: str = "readings_latest") -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / "gold" / name))


def test_latest_value_of_a_group_that_lost_rows_is_recomputed(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    land_records(
        settings.data_dir,
        "readings",
        [_reading(1, 1.0), _reading(5, 5.0), _reading(2, 2.0, device="d2")],
    )
    processor.run_once()
    # An operator deletes the newest reading of d1 (not retention: gold must follow).
    DeltaTable(str(settings.data_dir / "silver" / "readings")).delete("value = 5.0")
    land_records(settings.data_dir, "readings", [_reading(3, 3.0, device="d2")])
    processor.run_once()

    latest = _latest(settings).sort("device_id")
    assert latest.select("device_id", "value").rows() == [("d1", 1.0), ("d2", 3.0)]


def test_latest_value_equals_recomputation_over_random_late_and_corrected_rows(
    settings: Settings,
) -> None:
    rng = random.Random(7)
    processor = Processor(settings, load_contracts())
    contract = load_contracts()["readings"]
    spec = next(s for s in contract.gold if s.name == "readings_latest")
    for _step in range(6):
        rows = [
            _reading(rng.randint(0, 600), rng.uniform(0, 9), device=f"d{rng.randint(0, 4)}")
            for _ in range(rng.randint(1, 30))
        ]
        land_records(settings.data_dir, "readings", rows)
        assert processor.run_once().failures == []
        silver = pl.read_delta(str(settings.data_dir / "silver" / "readings"))
        expected = gold_frame(silver, spec, contract)
        assert_frame_equal(_latest(settings).sort("device_id", "sensor"), expected)


def test_latest_values_takes_the_newest_instant_then_the_greatest_value() -> None:
    contract = load_contracts()["readings"]
    spec = next(s for s in contract.gold if s.name == "readings_latest")
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    rows = pl.DataFrame(
        {
            "device_id": ["a", "a", "a", "b"],
            "sensor": ["t", "t", "t", "t"],
            "ts": [t0, t0 + timedelta(minutes=1), t0 + timedelta(minutes=1), t0],
            "value": [9.0, 1.0, 2.0, 4.0],
        }
    )
    out = latest_values(rows, spec, "ts", latest_schema(spec, contract))
    assert out.select("device_id", "value").rows() == [("a", 2.0), ("b", 4.0)]


WIDE_KEYS = """
name = "meters"
keys = ["meter", "channel", "at"]
event_time = "at"

[[fields]]
name = "meter"
type = "string"

[[fields]]
name = "channel"
type = "string"

[[fields]]
name = "at"
type = "timestamp"

[[fields]]
name = "v"
type = "float"
required = true

[[gold]]
name = "meters_latest"
kind = "latest"
group_by = ["meter"]
value = "v"

[[gold]]
name = "meters_hourly"
kind = "window"
every = "1h"
group_by = ["meter"]
value = "v"
aggregates = ["count", "first", "last", "avg"]
"""


def _meters_processor(settings: Settings, tmp_path: Path, contract: str) -> Processor:
    directory = tmp_path / "contracts"
    directory.mkdir()
    (directory / "meters.toml").write_text(contract)
    return Processor(settings, load_contracts(directory))


def _assert_meters_gold_equals_recomputation(settings: Settings, tmp_path: Path) -> None:
    contract = load_contracts(tmp_path / "contracts")["meters"]
    silver = pl.read_delta(str(settings.data_dir / "silver" / "meters"))
    for spec in contract.gold:
        keys = ["meter", "window_start"] if spec.kind == "window" else ["meter"]
        expected = gold_frame(silver, spec, contract).sort(keys)
        gold = pl.read_delta(str(settings.data_dir / "gold" / spec.name)).sort(keys)
        assert_frame_equal(gold, expected, check_exact=False)


def test_groups_with_several_rows_per_instant_equal_recomputation(
    settings: Settings, tmp_path: Path
) -> None:
    processor = _meters_processor(settings, tmp_path, WIDE_KEYS)
    rng = random.Random(11)
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    for _step in range(5):
        rows = [
            {
                "meter": f"m{rng.randint(0, 2)}",
                "channel": rng.choice(["a", "b"]),
                "at": (t0 + timedelta(minutes=rng.randint(0, 180))).isoformat(),
                "v": rng.uniform(0, 9),
            }
            for _ in range(rng.randint(1, 25))
        ]
        land_records(settings.data_dir, "meters", rows)
        assert processor.run_once().failures == []
    silver = pl.read_delta(str(settings.data_dir / "silver" / "meters"))
    assert silver.select("meter", "at").is_duplicated().any()  # the case under test
    _assert_meters_gold_equals_recomputation(settings, tmp_path)


NULLABLE_VALUE = """
name = "meters"
keys = ["meter", "at"]
event_time = "at"

[[fields]]
name = "meter"
type = "string"

[[fields]]
name = "at"
type = "timestamp"

[[fields]]
name = "v"
type = "float"

[[gold]]
name = "meters_hourly"
kind = "window"
every = "1h"
group_by = ["meter"]
value = "v"
aggregates = ["count", "sum", "avg", "min", "max"]

[[gold]]
name = "meters_daily"
kind = "window"
every = "1d"
group_by = ["meter"]
value = "v"
aggregates = ["count", "sum", "min", "max"]
"""


def test_windows_that_gain_rows_equal_recomputation_also_with_null_values(
    settings: Settings, tmp_path: Path
) -> None:
    """Combined (count/sum/min/max) and recomputed (avg of a nullable value) windows."""
    processor = _meters_processor(settings, tmp_path, NULLABLE_VALUE)
    rng = random.Random(5)
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    minutes = list(range(0, 60 * 30, 7))
    rng.shuffle(minutes)
    for step in range(6):
        rows = [
            {
                "meter": f"m{rng.randint(0, 2)}",
                "at": (t0 + timedelta(minutes=minute)).isoformat(),
                "v": None if rng.random() < 0.2 else rng.uniform(-5, 9),
            }
            for minute in minutes[step * 40 : (step + 1) * 40]
        ]
        land_records(settings.data_dir, "meters", rows)
        assert processor.run_once().failures == []
        _assert_meters_gold_equals_recomputation(settings, tmp_path)


def _backlog_of_four_files(settings: Settings) -> None:
    for minute in range(4):
        land_records(settings.data_dir, "readings", [_reading(minute * 30, float(minute))])


def test_gold_takes_in_a_backlog_in_fewer_refreshes_and_ends_current(data_dir: Path) -> None:
    settings = load_settings(
        data_dir=data_dir, file_settle_ms=0, batch_max_files=1, gold_catch_up_ms=60_000
    )
    _backlog_of_four_files(settings)
    processor = Processor(settings, load_contracts())
    report = processor.run_once()

    assert len(report.bronze) == 4 and len(report.silver) == 4
    # Gold follows the first micro-batch at once, then waits for the backlog's end.
    tables = [r.table for r in report.gold]
    assert tables == 2 * ["readings_hourly", "readings_daily", "readings_latest"]
    silver = pl.read_delta(str(settings.data_dir / "silver" / "readings"))
    contract = load_contracts()["readings"]
    for spec in contract.gold:
        gold = pl.read_delta(str(settings.data_dir / "gold" / spec.name))
        keys = [c for c in ("device_id", "sensor", "window_start") if c in gold.columns]
        assert_frame_equal(gold.sort(keys), gold_frame(silver, spec, contract).sort(keys))
    # Every micro-batch's files are counted when gold takes them in.
    counts = [
        sample.value
        for metric in processor.metrics.end_to_end.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    ]
    assert counts == [4]


def test_without_catch_up_gold_follows_every_micro_batch(data_dir: Path) -> None:
    settings = load_settings(
        data_dir=data_dir, file_settle_ms=0, batch_max_files=1, gold_catch_up_ms=0
    )
    _backlog_of_four_files(settings)
    report = Processor(settings, load_contracts()).run_once()
    assert len(report.bronze) == 4
    assert len(report.gold) == 4 * 3


LATEST_BY_KEY = """
name = "meters"
keys = ["meter"]
event_time = "at"

[[fields]]
name = "meter"
type = "string"

[[fields]]
name = "at"
type = "timestamp"
required = true

[[fields]]
name = "v"
type = "float"
required = true

[[gold]]
name = "meters_latest"
kind = "latest"
group_by = ["meter"]
value = "v"
"""


def test_latest_follows_an_update_that_moves_a_key_back_in_time(
    settings: Settings, tmp_path: Path
) -> None:
    """Event time outside the key: a correction can move the only row to an earlier instant."""
    processor = _meters_processor(settings, tmp_path, LATEST_BY_KEY)
    land_records(
        settings.data_dir, "meters", [{"meter": "m", "at": "2026-11-20T00:10:00Z", "v": 1}]
    )
    processor.run_once()
    land_records(
        settings.data_dir, "meters", [{"meter": "m", "at": "2026-11-20T00:05:00Z", "v": 2}]
    )
    assert processor.run_once().failures == []
    latest = pl.read_delta(str(settings.data_dir / "gold" / "meters_latest"))
    assert latest.select("meter", "v").rows() == [("m", 2.0)]
    _assert_meters_gold_equals_recomputation(settings, tmp_path)


# ------------------------------------------------ silver takes bronze's appended rows


def _bronze_ingestor(data_dir: Path, partitioned: bool) -> BronzeIngestor:
    return BronzeIngestor(
        LandingLayout(data_dir),
        TableStore(data_dir),
        BronzeLimits(max_files=10, max_bytes=2**30, max_file_bytes=2**30),
        CrashPoints(None),
        frozenset({"events"}) if partitioned else frozenset(),
    )


@pytest.mark.parametrize("partitioned", [False, True])
def test_appended_rows_equal_the_change_feed_of_their_commit(
    data_dir: Path, partitioned: bool
) -> None:
    """Commits that create the table, add a column, lack a column, drop re-delivered
    Kafka records and hold several files: each one's appended rows, shaped by
    ``as_inserts``, are exactly what the change feed reads back for that commit."""
    ingestor = _bronze_ingestor(data_dir, partitioned)
    kafka = {"kafka_topic": "t", "kafka_partition": "0"}
    batches: list[list[list[dict[str, object]]]] = [
        [[{"id": "1", "v": 1.5}]],
        [[{"id": "2", "v": 2, "extra": "x"}], [{"id": "3", "Extra": "y"}]],
        [[{"id": "4"}]],
        [[{"id": "5", **kafka, "kafka_offset": "7"}, {"id": "6", **kafka, "kafka_offset": "8"}]],
        [[{"id": "5", **kafka, "kafka_offset": "7"}, {"id": "7", **kafka, "kafka_offset": "9"}]],
    ]
    checked = 0
    for files in batches:
        for rows in files:
            land_records(data_dir, "events", rows)
        assert ingestor.ingest_next("events") is not None
        appended = ingestor.take_appended("events")
        assert appended is not None
        assert ingestor.take_appended("events") is None  # handed over once
        table = DeltaTable(str(data_dir / "bronze" / "events"))
        assert appended.version == table.version()
        committed = int(table.history(1)[0]["timestamp"])
        from_feed = read_changes(table, appended.version, appended.version)
        shaped = as_inserts(appended.rows, table, appended.version, committed)
        arrival = ["_file_order", "_row"]  # the feed's row order is unspecified
        assert_frame_equal(shaped.sort(arrival), from_feed.sort(arrival))
        checked += from_feed.height
    assert checked == 7  # the re-delivered offset 7 was dropped, not appended twice


def test_silver_from_appended_rows_equals_silver_from_the_change_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same landing files give the same silver, quarantine and gold whether silver
    takes bronze's appended rows (the processor's path) or reads bronze's change feed
    (a silver that lags, e.g. after a restart), and the processor's path reads no feed."""
    batches = [
        [_reading(1, 1.0), _reading(2, 2.0), {"ts": "bad", "device_id": "d1", "sensor": "t"}],
        [_reading(3, 3.0), _reading(2, 20.0, "d2")],
        [_reading(2, 21.0), _reading(4, 4.0)],  # updates a stored key: a MERGE
    ]
    feed_reads = count_change_feed_reads(monkeypatch)
    results: dict[str, dict[str, pl.DataFrame]] = {}
    for mode in ("appended", "change feed"):
        data_dir = tmp_path / mode.replace(" ", "_")
        settings = load_settings(data_dir=data_dir, trigger_latency_ms=0, file_settle_ms=0)
        processor = Processor(settings, load_contracts())
        if mode == "change feed":
            monkeypatch.setattr(BronzeIngestor, "take_appended", lambda self, source: None)
        for rows in batches:
            land_records(data_dir, "readings", rows)
            processor.run_once()
        if mode == "appended":
            assert feed_reads == []
        else:
            assert len(feed_reads) == len(batches)
        results[mode] = {
            name: pl.read_delta(str(data_dir / name))
            .drop("_ingested_at", "_batch_id", "_landing_file", "_quarantined_at", strict=False)
            .sort(pl.all())
            for name in (
                "silver/readings",
                "quarantine/readings",
                "gold/readings_hourly",
                "gold/readings_latest",
            )
        }
    for name, frame in results["appended"].items():
        assert frame.height, name
        assert_frame_equal(frame, results["change feed"][name])


def test_gold_from_held_silver_rows_equals_gold_from_the_change_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gold takes silver's appended rows from memory when they are every version it has
    to consume (a backlog's catch-up takes several at once): the same gold as from the
    change feed, each held change set equal to what the feed reads; after a merge, or
    for versions it does not hold, gold reads the feed."""
    first = [[_reading(m, float(m), f"d{m % 3}") for m in range(k, k + 5)] for k in (0, 5, 10)]
    merge = [[_reading(2, 99.0, "d2"), _reading(40, 4.0)]]  # updates a stored key
    after = [[_reading(50, 5.0)], [_reading(51, 6.0, "d9")]]
    real_held = gold_module._held_changes
    real_read = gold_module.read_changes
    compared: list[int] = []
    feed_reads: list[int] = []

    def counted(table: DeltaTable, start: int, end: int, columns=None):  # type: ignore[no-untyped-def]
        feed_reads.append(end)
        return real_read(table, start, end, columns)

    monkeypatch.setattr(gold_module, "read_changes", counted)

    def checked_held(silver: DeltaTable, inserted, done, columns):  # type: ignore[no-untyped-def]
        held = real_held(silver, inserted, done, columns)
        if held is not None:
            feed = gold_module._silver_changes(silver, done, set(), columns)
            order = [*columns, "_commit_version"]
            assert_frame_equal(held.sort(order), feed.sort(order))
            compared.append(held.height)
        return held

    results: dict[str, dict[str, pl.DataFrame]] = {}
    for mode in ("held", "change feed"):
        data_dir = tmp_path / mode.replace(" ", "_")
        settings = load_settings(
            data_dir=data_dir, trigger_latency_ms=0, file_settle_ms=0, batch_max_files=1,
            gold_catch_up_ms=60_000,
        )  # fmt: skip
        monkeypatch.setattr(
            gold_module, "_held_changes", checked_held if mode == "held" else lambda *a: None
        )
        feed_reads.clear()
        processor = Processor(settings, load_contracts())
        for rows in first:  # a backlog: three micro-batches, gold catches up once
            land_records(data_dir, "readings", rows)
        processor.run_once()
        for group in (merge, after):
            for rows in group:
                land_records(data_dir, "readings", rows)
            processor.run_once()
        if mode == "held":
            # The first refresh creates gold (no feed), the backlog's next two micro-batches
            # are held (one catch-up), the merge's is read, the two appends after it held.
            assert compared == [10, 2]
            assert len(feed_reads) - len(compared) == 1  # less the check's own reads
            # Rows of a later version alone do not stand for the versions before it.
            silver = DeltaTable(str(data_dir / "silver" / "readings"))
            rows, table_id = pl.DataFrame({"value": [6.0]}), str(silver.metadata().id)
            latest = SilverInserts(silver.version(), rows, table_id)
            assert real_held(silver, [latest], silver.version() - 1, ["value"]) is not None
            assert real_held(silver, [latest], silver.version() - 2, ["value"]) is None
            # Nor do rows of another table that had the same versions (a re-created one).
            other = SilverInserts(silver.version(), rows, "another-table-id")
            assert real_held(silver, [other], silver.version() - 1, ["value"]) is None
        results[mode] = {
            name: pl.read_delta(str(data_dir / "gold" / name)).sort(pl.all())
            for name in ("readings_hourly", "readings_daily", "readings_latest")
        }
    for name, frame in results["held"].items():
        assert frame.height, name
        assert_frame_equal(frame, results["change feed"][name])


def test_a_silver_that_lags_reads_every_version_it_missed(data_dir: Path) -> None:
    """Handed the rows of bronze's latest commit while an earlier one is unconsumed
    too, silver reads both from the change feed instead of taking only the last."""
    contract = load_contracts()["readings"]
    ingestor = BronzeIngestor(
        LandingLayout(data_dir),
        TableStore(data_dir),
        BronzeLimits(max_files=1, max_bytes=2**30, max_file_bytes=2**30),
        CrashPoints(None),
    )
    land_records(data_dir, "readings", [_reading(1, 1.0)])
    land_records(data_dir, "readings", [_reading(2, 2.0)])
    assert ingestor.ingest_next("readings") is not None
    assert ingestor.ingest_next("readings") is not None
    appended = ingestor.take_appended("readings")
    assert appended is not None and appended.rows.height == 1
    promoted = SilverPromoter(TableStore(data_dir), CrashPoints(None)).promote(contract, appended)
    assert promoted is not None and promoted.result.rows_in == 2
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert sorted(silver["value"].to_list()) == [1.0, 2.0]


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    files=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    versions=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_arrival_is_the_same_whether_rows_come_sorted_or_not(
    files: list[int], versions: list[int], shuffle: bool, seed: int
) -> None:
    """Rows bronze hands over in order skip the sort; any other order is sorted first."""
    rows = pl.DataFrame(
        [
            (version, order, row, f"r{version}-{order}-{row}")
            for version in sorted(set(versions))
            for order, height in enumerate(files)
            for row in range(height)
        ],
        schema={
            "_commit_version": pl.Int64,
            "_file_order": pl.Int64,
            "_row": pl.Int64,
            "id": pl.String,
        },
        orient="row",
    )
    expected = rows.with_columns(
        (pl.col("_commit_version") * 2**32 + pl.int_range(pl.len()).over("_commit_version")).alias(
            "_arrival"
        )
    )
    given_rows = rows.sample(fraction=1.0, shuffle=True, seed=seed) if shuffle else rows
    assert_frame_equal(with_arrival(given_rows), expected, check_row_order=False)
    assert with_arrival(given_rows)["_arrival"].is_sorted()


def test_a_merge_that_changes_nothing_still_records_its_marker(tmp_path: Path) -> None:
    """Every upsert removes a window gold never stored (``_present`` false): the MERGE
    commits nothing, and the marker goes in an empty append of the table's columns."""
    from delta_processing.gold import GOLD_APP_ID, PRESENT, _apply_upserts
    from delta_processing.tables import commit_marker, consumed_version

    store = TableStore(tmp_path)
    schema = pl.Schema({"device_id": pl.String(), "count": pl.Int64()})
    gold = ensure_table(store, "gold", "counts", schema, cdf=False)
    absent = pl.DataFrame(
        {"device_id": ["never-stored"], "count": [None], PRESENT: [False]},
        schema={**schema, PRESENT: pl.Boolean()},
    )
    _apply_upserts(gold, absent, ["device_id"], commit_marker(GOLD_APP_ID, 7))
    gold.update_incremental()
    assert consumed_version(gold, GOLD_APP_ID) == 7
    assert gold.count() == 0
    assert [f.name for f in gold.schema().fields] == ["device_id", "count"]
