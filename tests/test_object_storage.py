"""Delta tables on Azure Blob Storage (Azurite): the whole pipeline, serving, maintenance.

The landing zone stays on local disk; every table goes to ``az://<container>/lake``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from analytics import QueryLimits, connect, run_query
from analytics.catalog import snapshot_tables
from config.contracts import load_contracts
from config.settings import Settings, SettingsError, load_settings
from delta_processing.maintenance import MaintenancePolicy, last_checkpoint_version, vacuum
from delta_processing.processor import Processor
from delta_processing.tables import TableStore
from tests.azurite import Azurite
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, land_records, reference_gold

CONTAINER = "lakehouse"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    emulator = Azurite(tmp_path_factory.mktemp("azurite") / "data")
    emulator.start()
    saved = os.environ.get("AZURITE_BLOB_STORAGE_URL")
    os.environ.update(emulator.emulator_env())  # object_store reads it when a table opens
    try:
        emulator.create_container(CONTAINER)
        yield emulator
    finally:
        if saved is None:
            os.environ.pop("AZURITE_BLOB_STORAGE_URL", None)
        else:
            os.environ["AZURITE_BLOB_STORAGE_URL"] = saved
        emulator.stop()


def _settings(azurite: Azurite, data_dir: Path, prefix: str, **extra: object) -> Settings:
    extra.setdefault("storage_options", azurite.storage_options)
    return load_settings(
        data_dir=data_dir,
        storage_uri=f"az://{CONTAINER}/{prefix}",
        trigger_latency_ms=0,
        file_settle_ms=0,
        **extra,
    )


def _reading(minute: int, value: float, device: str = "d1") -> dict[str, object]:
    ts = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(minutes=minute)
    return {"ts": ts.isoformat(), "device_id": device, "sensor": "t", "value": value}


def _read(store: TableStore, layer: str, name: str = "readings") -> pl.DataFrame:
    # Straight through deltalake with the same options: what any other reader would see.
    table = DeltaTable(store.uri(layer, name), storage_options=store.options)
    frame = pl.from_arrow(table.to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def test_pipeline_runs_with_every_table_on_azurite(azurite: Azurite, data_dir: Path) -> None:
    # object_store's own client options pass through as text ("max_retries" is also a
    # Polars option that must be a number: the processor must not hand it to Polars).
    options = {**azurite.storage_options, "max_retries": "3", "timeout": "30s"}
    settings = _settings(
        azurite, data_dir, "pipeline", checkpoint_interval=2, storage_options=options
    )
    store = TableStore.from_settings(settings)
    assert store.uri("gold", "x") == f"az://{CONTAINER}/pipeline/gold/x"
    processor = Processor(settings, load_contracts())

    land_records(data_dir, "readings", [_reading(1, 1.0), _reading(2, 2.0, "d2")])
    processor.run_once()
    # A correction of an existing key, a late reading and a row the contract quarantines.
    land_records(data_dir, "readings", [_reading(1, 10.0), _reading(70, 7.0)])
    land_records(data_dir, "readings", [{"ts": "not a time", "device_id": "d1", "sensor": "t"}])
    report = processor.run_once()
    assert report.failures == []

    # Nothing Delta on local disk: only the landing zone, its archive and local metadata.
    assert not any((data_dir / layer).exists() for layer in ("bronze", "silver", "gold"))
    assert len([p for p in (data_dir / "archive" / "readings").rglob("*") if p.is_file()]) == 3

    assert store.list("gold") == ["readings_daily", "readings_hourly", "readings_latest"]
    assert store.list("bronze") == ["readings"]
    assert _read(store, "bronze").height == 5
    silver = _read(store, "silver").sort("device_id", "ts")
    assert silver.select("device_id", "value").rows() == [("d1", 10.0), ("d1", 7.0), ("d2", 2.0)]
    assert _read(store, "quarantine").height == 1
    for name, reference in reference_gold(silver).items():
        keys = [c for c in ("device_id", "sensor", "window_start") if c in reference.columns]
        assert_frame_equal(
            _read(store, "gold", name).sort(keys), reference.sort(keys), check_exact=False
        )

    # Serving: DuckDB reads remote tables through Arrow, sandboxed or not.
    for sandboxed in (False, True):
        con = connect(store, sandboxed=sandboxed)
        hourly = con.sql(
            "SELECT device_id, sum(count) AS n, max(max) AS top FROM gold.readings_hourly "
            "GROUP BY device_id ORDER BY device_id"
        ).pl()
        assert hourly.rows() == [("d1", 2, 10.0), ("d2", 1, 2.0)]
        assert con.sql("SELECT count(*) FROM bronze.readings").fetchall() == [(5,)]
    result = run_query(store, "SELECT count(*) AS n FROM silver.readings", QueryLimits(30, 10))
    assert result.to_pylist() == [{"n": 3}]
    with pytest.raises(Exception, match=r"(?i)permission|disabled|external"):
        connect(store, sandboxed=True).sql(f"SELECT * FROM read_text('{data_dir}/_meta/x')")
    assert {s.qualified_name for s in snapshot_tables(store)} >= {"gold.readings_hourly"}


def test_maintenance_on_azurite(azurite: Azurite, data_dir: Path) -> None:
    """Compaction, checkpoints, log cleanup, vacuum and retention all reach object storage."""
    settings = _settings(
        azurite, data_dir, "maintenance", checkpoint_interval=2, retention_bronze_days=1
    )
    store = TableStore.from_settings(settings)
    processor = Processor(settings, load_contracts())
    for minute in range(10):
        land_records(data_dir, "readings", [_reading(minute, float(minute))])
        processor.run_once()
    bronze = store.open("bronze", "readings")
    assert bronze is not None and len(bronze.file_uris()) == 10

    processor.housekeeping()

    bronze = store.open("bronze", "readings")
    assert bronze is not None
    assert len(bronze.file_uris()) == 1  # compacted
    assert last_checkpoint_version(bronze) is not None  # read from the blob store
    assert _read(store, "bronze").height == 10  # nothing lost, nothing expired (all new)
    assert _read(store, "silver").height == 10
    # Vacuum finds the compacted-away files on the blob store and deletes them; a second
    # run finds nothing (deltalake would list the deleted files again: they are checked).
    zero = MaintenancePolicy(vacuum_retention=timedelta(0))
    table = store.open("bronze", "readings")
    assert table is not None
    assert len(vacuum(table, zero, dry_run=True, allow_below_table_minimum=True)) == 10
    assert len(vacuum(table, zero, dry_run=False, allow_below_table_minimum=True)) == 10
    assert vacuum(table, zero, dry_run=True, allow_below_table_minimum=True) == []
    assert _read(store, "bronze").height == 10
    # More data after maintenance still flows to gold.
    land_records(data_dir, "readings", [_reading(11, 11.0)])
    assert processor.run_once().failures == []
    assert _read(store, "silver").height == 11


def test_missing_tables_and_layers_on_azurite(azurite: Azurite, data_dir: Path) -> None:
    store = TableStore.from_settings(_settings(azurite, data_dir, "empty"))
    assert store.open("silver", "nothing") is None
    assert store.list("gold") == []
    assert snapshot_tables(store) == []
    assert connect(store).sql("SELECT 1").fetchall() == [(1,)]


def test_cli_reads_tables_on_azurite_from_environment(azurite: Azurite, data_dir: Path) -> None:
    settings = _settings(azurite, data_dir, "cli")
    land_records(data_dir, "readings", [_reading(1, 1.0), _reading(2, 2.0)])
    Processor(settings, load_contracts()).run_once()
    env = lakehouse_env(
        data_dir,
        LAKEHOUSE_STORAGE_URI=f"az://{CONTAINER}/cli",
        LAKEHOUSE_STORAGE_OPTIONS=json.dumps(azurite.storage_options),
        **azurite.emulator_env(),
    )
    done = subprocess.run(
        [*LAKEHOUSE, "sql", "SELECT count(*) AS n FROM silver.readings", "--format", "json"],
        cwd=REPO, env=env, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == [{"n": 2}]
    tables = subprocess.run(
        [*LAKEHOUSE, "tables"], cwd=REPO, env=env, capture_output=True, timeout=120, check=False
    )
    assert tables.returncode == 0, tables.stderr.decode()
    assert "gold.readings_hourly" in tables.stdout.decode()


def test_storage_settings_are_validated_and_secret(data_dir: Path) -> None:
    local = load_settings(data_dir=data_dir)
    assert TableStore.from_settings(local) == TableStore(data_dir)
    assert TableStore.from_settings(local).uri("gold", "x") == str(data_dir / "gold" / "x")
    with pytest.raises(SettingsError, match=r"LAKEHOUSE_STORAGE_URI.*unsupported scheme 'ftp'"):
        load_settings(data_dir=data_dir, storage_uri="ftp://host/x")
    with pytest.raises(SettingsError, match=r"LAKEHOUSE_STORAGE_URI.*container or bucket"):
        load_settings(data_dir=data_dir, storage_uri="az:///x")
    with pytest.raises(SettingsError, match="LAKEHOUSE_ARCHIVE_URI"):
        load_settings(data_dir=data_dir, archive_uri="s3://bucket")
    with pytest.raises(SettingsError) as bad:
        load_settings(data_dir=data_dir, storage_options="{not json hunter2")
    assert "hunter2" not in str(bad.value)
    remote = load_settings(
        data_dir=data_dir,
        storage_uri="az://c/p/",
        azure_storage_account_name="acct",
        azure_storage_account_key="hunter2",
        storage_options={"use_emulator": "true"},
    )
    store = TableStore.from_settings(remote)
    assert store.root == "az://c/p"
    assert store.options == {
        "account_name": "acct", "account_key": "hunter2", "use_emulator": "true"
    }  # fmt: skip
    assert "hunter2" not in repr(remote) and "hunter2" not in repr(store)
    file_uri = load_settings(data_dir=data_dir, storage_uri=f"file://{data_dir}/tables")
    assert TableStore.from_settings(file_uri).local_root == data_dir / "tables"
