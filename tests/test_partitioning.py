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
from config.contracts import ContractRegistry, load_contracts
from config.settings import load_settings
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
