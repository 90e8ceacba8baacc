"""Partitioned bronze (ingest date) and silver (event date) behave like unpartitioned ones."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from analytics import connect
from config.contracts import ContractRegistry, Partitioning, load_contracts
from config.settings import load_settings
from delta_processing.gold import gold_frame
from delta_processing.processor import Processor
from delta_processing.refresh import refresh
from delta_processing.tables import TableStore
from landing_zone.formats import decode_batch
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter


def _partitioned(contract_registry: ContractRegistry) -> ContractRegistry:
    readings = contract_registry["readings"]
    partitioning = readings.partitioning.model_copy(
        update={"bronze": "ingest_date", "silver": "event_date"}
    )
    return ContractRegistry(
        {"readings": readings.model_copy(update={"partitioning": partitioning})}
    )


def _batches(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    batches = []
    for _ in range(5):
        rows = [
            {
                "ts": (base + timedelta(minutes=rng.randint(0, 10 * 24 * 60))).isoformat(),
                "device_id": f"d{rng.randint(0, 3)}",
                "sensor": "t",
                "value": rng.randint(0, 100),
            }
            for _ in range(rng.randint(5, 40))
        ]
        rows += [dict(r, value=-1) for r in rng.sample(rows, 3)]  # corrections
        batches.append(b"\n".join(json.dumps(r).encode() for r in rows))
    return batches


def _run(data_dir: Path, contracts: ContractRegistry, batches: list[bytes]) -> None:
    processor = Processor(load_settings(data_dir=data_dir), contracts)
    writer = LandingWriter(LandingLayout(data_dir))
    for body in batches:
        writer.write_frame("readings", decode_batch(body, "ndjson"))
        assert processor.run_once().failures == []


def test_partitioned_tables_hold_the_same_data(tmp_path: Path) -> None:
    batches = _batches(3)
    plain, parted = tmp_path / "plain", tmp_path / "parted"
    _run(plain, load_contracts(), batches)
    _run(parted, _partitioned(load_contracts()), batches)

    assert DeltaTable(str(parted / "bronze" / "readings")).metadata().partition_columns == [
        "_ingest_date"
    ]
    silver_table = DeltaTable(str(parted / "silver" / "readings"))
    assert silver_table.metadata().partition_columns == ["_event_date"]
    assert len({Path(u).parent.name for u in silver_table.file_uris()}) > 5  # one dir per day

    keys = ["device_id", "sensor", "ts"]
    columns = ["ts", "device_id", "sensor", "value"]
    for layer, name in [("silver", "readings"), ("gold", "readings_hourly"),
                        ("gold", "readings_daily"), ("gold", "readings_latest")]:  # fmt: skip
        a = pl.read_delta(str(plain / layer / name))
        b = pl.read_delta(str(parted / layer / name))
        cols = columns if layer == "silver" else a.columns
        sort = [c for c in [*keys, "window_start"] if c in a.columns]
        assert_frame_equal(a.select(cols).sort(sort), b.select(cols).sort(sort))

    con = connect(parted)
    rows = con.sql(
        "SELECT _event_date, count(*) FROM silver.readings "
        "WHERE _event_date = DATE '2026-11-03' GROUP BY 1"
    ).fetchall()
    expected = pl.read_delta(str(plain / "silver" / "readings")).filter(
        pl.col("ts").dt.date() == datetime(2026, 11, 3).date()
    )
    assert rows == [(datetime(2026, 11, 3).date(), expected.height)]


def test_changing_partitioning_asks_for_a_refresh(tmp_path: Path) -> None:
    data_dir = tmp_path / "dados"
    _run(data_dir, load_contracts(), _batches(4)[:1])
    parted = _partitioned(load_contracts())
    settings = load_settings(data_dir=data_dir)
    LandingWriter(LandingLayout(data_dir)).write_frame(
        "readings", decode_batch(_batches(4)[1], "ndjson")
    )
    failures = Processor(settings, parted).run_once().failures
    assert len(failures) == 1
    assert "silver/readings is partitioned by nothing" in failures[0]
    assert "lakehouse refresh silver/readings" in failures[0]
    refresh(TableStore(data_dir), parted["readings"], "silver")
    assert Processor(settings, parted).run_once().failures == []
    table = DeltaTable(str(data_dir / "silver" / "readings"))
    assert table.metadata().partition_columns == ["_event_date"]


def test_a_key_value_folder_above_the_data_directory_is_not_a_partition(tmp_path: Path) -> None:
    """``env=prod/dados``: Polars' Delta scan would read ``env`` as a hive column."""
    batches = _batches(5)
    plain, nested = tmp_path / "plain", tmp_path / "env=prod" / "dados"
    _run(plain, _partitioned(load_contracts()), batches)
    _run(nested, _partitioned(load_contracts()), batches)
    for layer, name in [("silver", "readings"), ("gold", "readings_hourly"),
                        ("gold", "readings_latest")]:  # fmt: skip
        a = pl.read_delta(str(plain / layer / name)).drop(
            "_ingested_at", "_batch_id", "_arrival", strict=False
        )
        b = pl.from_arrow(DeltaTable(str(nested / layer / name)).to_pyarrow_table()).drop(
            "_ingested_at", "_batch_id", "_arrival", strict=False
        )
        assert isinstance(b, pl.DataFrame) and "env" not in b.columns
        sort = [c for c in ("device_id", "sensor", "ts", "window_start") if c in a.columns]
        assert_frame_equal(a.sort(sort), b.sort(sort))
    silver_rows = pl.read_delta(str(plain / "silver" / "readings")).height
    con = connect(nested)
    assert con.sql("SELECT count(*) FROM silver.readings").fetchall() == [(silver_rows,)]
    assert "env" not in [c[0] for c in con.sql("DESCRIBE silver.readings").fetchall()]


def _with_gold_partitioning(contracts: ContractRegistry, mode: str) -> ContractRegistry:
    readings = contracts["readings"]
    partitioning = readings.partitioning.model_copy(update={"gold": mode})
    return ContractRegistry(
        {"readings": readings.model_copy(update={"partitioning": partitioning})}
    )


def _days_of_readings(days: int) -> bytes:
    """Four devices, one reading per hour, over ``days`` days from 2026-11-01."""
    base = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [
        {
            "ts": (base + timedelta(hours=h)).isoformat(),
            "device_id": f"d{d}",
            "sensor": "t",
            "value": float(h % 7 + d),
        }
        for h in range(days * 24)
        for d in range(4)
    ]
    return b"\n".join(json.dumps(r).encode() for r in rows)


def _equals_recomputation(data_dir: Path, contracts: ContractRegistry) -> None:
    contract = contracts["readings"]
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    for spec in contract.gold:
        # The logical columns: a table kept unpartitioned has no _window_date.
        expected = gold_frame(silver, spec, contract).drop("_window_date", strict=False)
        got = pl.read_delta(str(data_dir / "gold" / spec.name))
        keys = [c for c in ("device_id", "sensor", "window_start") if c in expected.columns]
        assert_frame_equal(got.select(expected.columns).sort(keys), expected.sort(keys))


def test_window_gold_merges_rewrite_only_the_days_they_touch(tmp_path: Path) -> None:
    """Without partitions a window table is one file that every MERGE rewrites whole, so a
    micro-batch would cost in proportion to the table's age."""
    data_dir = tmp_path / "dados"
    contracts = load_contracts()
    _run(data_dir, contracts, [_days_of_readings(10)])
    hourly = DeltaTable(str(data_dir / "gold" / "readings_hourly"))
    assert hourly.metadata().partition_columns == ["_window_date"]
    day = "_window_date=2026-11-05"
    before = set(hourly.file_uris())
    assert len(before) == 10 and sum(day in u for u in before) == 1

    late = {"ts": "2026-11-05T10:30:00+00:00", "device_id": "d1", "sensor": "t", "value": 99.0}
    _run(data_dir, contracts, [json.dumps(late).encode()])
    hourly.update_incremental()
    after = set(hourly.file_uris())
    assert {u for u in after if day not in u} == {u for u in before if day not in u}
    metrics = hourly.history(1)[0]["operationMetrics"]
    assert metrics["num_target_files_removed"] == 1
    assert metrics["num_target_rows_updated"] == 1
    assert metrics["num_target_rows_copied"] == 4 * 24 - 1  # that day's other windows only
    _equals_recomputation(data_dir, contracts)


def test_an_unpartitioned_gold_table_is_kept_until_refreshed(tmp_path: Path) -> None:
    data_dir = tmp_path / "dados"
    plain = _with_gold_partitioning(load_contracts(), "none")
    _run(data_dir, plain, [_days_of_readings(2)])
    assert DeltaTable(str(data_dir / "gold" / "readings_hourly")).metadata().partition_columns == []
    _equals_recomputation(data_dir, plain)

    contracts = load_contracts()  # the default: window tables partitioned by _window_date
    more = {"ts": "2026-11-02T05:00:00+00:00", "device_id": "d9", "sensor": "t", "value": 1.0}
    _run(data_dir, contracts, [json.dumps(more).encode()])  # no failure: the layout is kept
    hourly = DeltaTable(str(data_dir / "gold" / "readings_hourly"))
    assert hourly.metadata().partition_columns == []
    _equals_recomputation(data_dir, plain)

    refresh(TableStore(data_dir), contracts["readings"], "readings_hourly")
    hourly = DeltaTable(str(data_dir / "gold" / "readings_hourly"))
    assert hourly.metadata().partition_columns == ["_window_date"]
    _equals_recomputation(data_dir, contracts)
    con = connect(data_dir)
    assert con.sql(
        "SELECT _window_date, count(*) FROM gold.readings_hourly GROUP BY 1 ORDER BY 1"
    ).fetchall() == [
        (datetime(2026, 11, 1).date(), 4 * 24),
        (datetime(2026, 11, 2).date(), 4 * 24 + 1),
    ]


def test_silver_merges_skip_files_outside_the_batch_event_times(tmp_path: Path) -> None:
    """A correction MERGE reads only the silver files whose event times it can match."""
    data_dir = tmp_path / "dados"
    contracts = load_contracts()
    base = datetime(2026, 11, 1, tzinfo=UTC)
    days = [
        b"\n".join(
            json.dumps(
                {
                    "ts": (base + timedelta(days=day, minutes=m)).isoformat(),
                    "device_id": "d1",
                    "sensor": "t",
                    "value": float(m),
                }
            ).encode()
            for m in range(50)
        )
        for day in range(6)
    ]
    _run(data_dir, contracts, days)  # one silver append (one file) per day
    silver = DeltaTable(str(data_dir / "silver" / "readings"))
    assert len(silver.file_uris()) == 6
    fix = {"ts": (base + timedelta(days=3, minutes=7)).isoformat(), "device_id": "d1",
           "sensor": "t", "value": -5.0}  # fmt: skip
    _run(data_dir, contracts, [json.dumps(fix).encode()])
    silver.update_incremental()
    merged = silver.history(1)[0]
    assert merged["operation"] == "MERGE"
    metrics = merged["operationMetrics"]
    assert metrics["num_target_files_skipped_during_scan"] == 5
    assert metrics["num_target_rows_updated"] == 1
    rows = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert rows.height == 6 * 50
    assert rows.filter(pl.col("value") == -5.0)["ts"].to_list() == [
        base + timedelta(days=3, minutes=7)
    ]


def test_refresh_takes_a_table_back_to_no_partitions(tmp_path: Path) -> None:
    """``partitioning = "none"`` after a partitioned layout: the rebuild drops the
    partitions (deltalake keeps a table's partitioning when a write names none)."""
    data_dir = tmp_path / "dados"
    parted = _partitioned(load_contracts())  # silver by event date, gold by window date
    _run(data_dir, parted, [_days_of_readings(2)])
    plain = ContractRegistry(
        {
            "readings": parted["readings"].model_copy(
                update={"partitioning": Partitioning(bronze="ingest_date", gold="none")}
            )
        }
    )
    store = TableStore(data_dir)
    refresh(store, plain["readings"], "silver")
    refresh(store, plain["readings"], "readings_hourly")
    for layer, name in (("silver", "readings"), ("gold", "readings_hourly")):
        assert DeltaTable(str(data_dir / layer / name)).metadata().partition_columns == []
    more = {"ts": "2026-11-02T05:00:00+00:00", "device_id": "d9", "sensor": "t", "value": 1.0}
    _run(data_dir, plain, [json.dumps(more).encode()])
    _equals_recomputation(data_dir, plain)
