"""Retention per layer: old rows expire; gold outlives silver."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from config.contracts import ContractRegistry, SourceContract, load_contracts
from config.settings import Settings
from delta_processing.gold import kept_past_horizon
from delta_processing.processor import Processor
from delta_processing.refresh import backfill, refresh
from delta_processing.retention import RetentionPolicy, apply_retention, retention_horizon
from delta_processing.tables import TableStore
from landing_zone.formats import decode_batch
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, land_records

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


def _send(settings: Settings, days_ago: list[int], bad: int = 0) -> None:
    rows: list[dict[str, object]] = [
        {"ts": (NOW - timedelta(days=d)).isoformat(), "device_id": "d", "sensor": "s", "value": d}
        for d in days_ago
    ]
    rows += [{"ts": "nope", "device_id": "d", "sensor": "s", "value": 1}] * bad
    body = b"\n".join(json.dumps(r).encode() for r in rows)
    LandingWriter(LandingLayout(settings.data_dir)).write_frame(
        "readings", decode_batch(body, "ndjson")
    )


def _read(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def test_silver_expires_by_event_time_and_gold_is_kept(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _send(settings, [400, 200, 10, 1], bad=1)
    processor.run_once()
    store = TableStore(settings.data_dir)
    contracts = list(load_contracts().values())
    results = apply_retention(store, contracts, RetentionPolicy(silver_days=365), NOW)
    assert [(r.table, r.rows_deleted) for r in results] == [("silver/readings", 1)]
    assert sorted(_read(settings, "silver/readings")["value"].to_list()) == [1.0, 10.0, 200.0]
    # The pipeline goes on; gold still holds the expired row's day.
    _send(settings, [2])
    processor.run_once()
    daily = _read(settings, "gold/readings_daily")
    assert daily.height == 5 and 400.0 in daily["sum"].to_list()
    assert _read(settings, "bronze/readings").height == 6  # bronze has no retention here


def test_every_layer_with_a_retention_expires(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _send(settings, [40, 3], bad=2)
    processor.run_once()
    policy = RetentionPolicy(bronze_days=30, silver_days=30, quarantine_days=30, gold_days=30)
    store = TableStore(settings.data_dir)
    contracts = list(load_contracts().values())
    # Bronze and quarantine age by arrival: everything here arrived just now.
    assert {r.table for r in apply_retention(store, contracts, policy, NOW)} == {
        "silver/readings",
        "gold/readings_hourly",
        "gold/readings_daily",
    }
    later = datetime.now(UTC) + timedelta(days=31)
    expired = {r.table: r.rows_deleted for r in apply_retention(store, contracts, policy, later)}
    assert expired["bronze/readings"] == 4 and expired["quarantine/readings"] == 2
    assert _read(settings, "bronze/readings").height == 0


def test_retention_apply_command(tmp_path: Path) -> None:
    import subprocess

    data_dir = tmp_path / "dados"
    landing = data_dir / "landing" / "readings"
    landing.mkdir(parents=True)
    old = (datetime.now(UTC) - timedelta(days=100)).isoformat()
    (landing / "a.ndjson").write_text(
        json.dumps({"ts": old, "device_id": "d", "sensor": "s", "value": 1}) + "\n"
    )
    env = lakehouse_env(data_dir, LAKEHOUSE_RETENTION_SILVER_DAYS="30")
    run = [*LAKEHOUSE]
    assert subprocess.run([*run, "process", "--once"], cwd=REPO, env=env).returncode == 0
    result = subprocess.run([*run, "retention", "apply"], cwd=REPO, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "silver/readings: 1 row(s)" in result.stdout


METERS = """
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
required = true

[[gold]]
name = "meters_daily"
kind = "window"
every = "1d"
group_by = ["meter"]
value = "v"
aggregates = ["count", "sum"]

[[gold]]
name = "meters_latest"
kind = "latest"
group_by = ["meter"]
value = "v"

[[gold]]
name = "meters_daily_sql"
kind = "sql"
every = "1d"
window_column = "day"
query = \"\"\"
SELECT meter, date_trunc('day', "at") AS day, count(*) AS n, sum(v) AS total
FROM silver GROUP BY ALL
\"\"\"
"""


def _meters(tmp_path: Path) -> SourceContract:
    directory = tmp_path / "contracts"
    directory.mkdir(exist_ok=True)
    (directory / "meters.toml").write_text(METERS)
    return load_contracts(directory)["meters"]


def _reading(meter: str, at: datetime, v: float | None) -> dict[str, object]:
    return {"meter": meter, "at": at.isoformat(), "v": v}


def _tables(settings: Settings, contract: SourceContract) -> dict[str, pl.DataFrame]:
    """Every gold table of ``contract``, in a comparable order and column set."""
    out = {}
    for spec in contract.gold:
        frame = _read(settings, f"gold/{spec.name}").drop("_window_date", strict=False)
        out[spec.name] = frame.sort(frame.columns)
    return out


def _assert_same(got: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame]) -> None:
    assert got.keys() == expected.keys()
    for name, frame in expected.items():
        assert_frame_equal(got[name], frame, check_exact=False)


def test_a_gold_rebuild_keeps_what_expired_silver_rows_made(
    settings: Settings, tmp_path: Path
) -> None:
    """Rebuilding gold from silver after silver's retention used to drop every window
    (and latest value) made of expired rows: gold outlives silver only incrementally."""
    contract = _meters(tmp_path)
    processor = Processor(settings, ContractRegistry({"meters": contract}))
    horizon = NOW - timedelta(days=365)
    land_records(settings.data_dir, "meters", [
        _reading("m1", NOW - timedelta(days=400), 1.0),
        _reading("m1", NOW - timedelta(days=400, hours=-1), 2.0),
        _reading("m2", NOW - timedelta(days=400), 5.0),  # m2 has nothing newer
        # One day across the horizon: its earlier reading expires, its later stays.
        _reading("m1", horizon - timedelta(hours=1), 7.0),
        _reading("m1", horizon + timedelta(hours=1), 8.0),
        _reading("m1", NOW - timedelta(days=1), 4.0),
    ])  # fmt: skip
    assert processor.run_once().failures == []
    before = _tables(settings, contract)
    store = TableStore(settings.data_dir)
    expired = apply_retention(store, [contract], RetentionPolicy(silver_days=365), NOW)
    assert [(r.table, r.rows_deleted) for r in expired] == [("silver/meters", 4)]
    silver = store.open("silver", "meters")
    assert silver is not None and retention_horizon(silver) == horizon

    for spec in contract.gold:
        refresh(store, contract, spec.name)
    _assert_same(_tables(settings, contract), before)
    # A rebuild of what silver still holds recomputes it: a late reading moves its day.
    land_records(
        settings.data_dir, "meters", [_reading("m1", NOW - timedelta(days=1, hours=1), 6.0)]
    )
    assert processor.run_once().failures == []
    daily = _read(settings, "gold/meters_daily").filter(pl.col("meter") == "m1")
    refresh(store, contract, "meters_daily")
    rebuilt = _read(settings, "gold/meters_daily").filter(pl.col("meter") == "m1")
    assert rebuilt.sort("window_start").equals(daily.sort("window_start"))
    assert rebuilt["count"].to_list() == [2, 2, 2]  # 400 days ago, across the horizon, now


def test_a_silver_refresh_keeps_rows_whose_bronze_rows_expired(
    settings: Settings, tmp_path: Path
) -> None:
    """Rebuilding silver from bronze after bronze's retention used to drop the silver
    (and quarantine) rows of every expired bronze row; gold, rebuilt after it, too."""
    contract = _meters(tmp_path)
    processor = Processor(settings, ContractRegistry({"meters": contract}))
    day = datetime.now(UTC).replace(microsecond=0)
    land_records(settings.data_dir, "meters", [
        _reading("m1", day - timedelta(days=3), 1.0),
        _reading("m1", day - timedelta(days=2), 2.0),
        _reading("m9", day - timedelta(days=2), None),  # quarantined: v is required
    ])  # fmt: skip
    assert processor.run_once().failures == []
    store = TableStore(settings.data_dir)
    # Bronze ages by arrival: a day from now, with one day of retention, all of it goes.
    policy = RetentionPolicy(bronze_days=1)
    expired = apply_retention(store, [contract], policy, datetime.now(UTC) + timedelta(days=1))
    assert [(r.table, r.rows_deleted) for r in expired] == [("bronze/meters", 3)]
    bronze = store.open("bronze", "meters")
    assert bronze is not None  # and its expired files gone, so no change feed has them
    bronze.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    land_records(settings.data_dir, "meters", [
        _reading("m1", day - timedelta(days=2), 20.0),  # a correction of a kept row
        _reading("m3", day - timedelta(days=1), 3.0),
        _reading("m8", day - timedelta(days=1), None),
    ])  # fmt: skip
    assert processor.run_once().failures == []
    fields = ["meter", "at", "v"]
    silver_before = _read(settings, "silver/meters").select(fields).sort(fields)
    assert silver_before["v"].to_list() == [1.0, 20.0, 3.0]
    gold_before = _tables(settings, contract)

    result = refresh(store, contract, "silver")
    assert result.rows == 2  # rebuilt from bronze; the third row is kept
    assert _read(settings, "silver/meters").select(fields).sort(fields).equals(silver_before)
    assert sorted(_read(settings, "quarantine/meters")["meter"]) == ["m8", "m9"]
    assert processor.run_once().failures == []  # gold rebuilds after silver's refresh
    _assert_same(_tables(settings, contract), gold_before)
    # A backfill reaching before the horizon leaves what bronze no longer holds.
    backfill(store, contract, day - timedelta(days=30), datetime.now(UTC) + timedelta(days=1))
    assert sorted(_read(settings, "quarantine/meters")["meter"]) == ["m8", "m9"]
    assert _read(settings, "silver/meters").select(fields).sort(fields).equals(silver_before)
    silver = store.open("silver", "meters")
    assert (
        silver is not None
        and silver.metadata().configuration.get("delta.enableChangeDataFeed") == "true"
    )


def test_retention_records_its_horizon_only_when_rows_go(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _send(settings, [400, 10])
    processor.run_once()
    store = TableStore(settings.data_dir)
    contracts = list(load_contracts().values())
    policy = RetentionPolicy(silver_days=365)
    silver = store.open("silver", "readings")
    assert silver is not None and retention_horizon(silver) is None
    version = silver.version()
    apply_retention(store, contracts, policy, NOW)
    silver = store.open("silver", "readings")
    assert silver is not None
    assert retention_horizon(silver) == NOW - timedelta(days=365)
    assert silver.version() == version + 2  # the horizon, then the delete
    # Nothing older left: no commit, and the horizon stays where rows were deleted.
    assert apply_retention(store, contracts, policy, NOW + timedelta(days=1)) == []
    silver = store.open("silver", "readings")
    assert silver is not None and silver.version() == version + 2
    assert retention_horizon(silver) == NOW - timedelta(days=365)


REVISED = """
name = "docs"
keys = ["id"]
event_time = "ts"
sequence = "rev"

[[fields]]
name = "id"
type = "string"

[[fields]]
name = "ts"
type = "timestamp"
required = true

[[fields]]
name = "rev"
type = "int"
required = true

[[fields]]
name = "kw"
type = "float"
{note}
"""
NOTE = '\n[[fields]]\nname = "note"\ntype = "string"\n'


def _docs(tmp_path: Path, *, with_note: bool) -> ContractRegistry:
    directory = tmp_path / f"docs-{with_note}"
    directory.mkdir(exist_ok=True)
    (directory / "docs.toml").write_text(REVISED.format(note=NOTE if with_note else ""))
    return load_contracts(directory)


def test_a_silver_refresh_after_bronze_retention_keeps_winners_and_a_working_schema(
    settings: Settings, tmp_path: Path
) -> None:
    """Kept rows used to lose to any rebuilt copy of their key, whatever its sequence,
    and brought back columns the contract had dropped, which then failed every append."""
    before = _docs(tmp_path, with_note=True)
    ts = "2026-11-20T10:00:00Z"
    land_records(settings.data_dir, "docs", [{"id": "a", "ts": ts, "rev": 10, "kw": 1.0,
                                              "note": "x"}])  # fmt: skip
    assert Processor(settings, before).run_once().failures == []
    store = TableStore(settings.data_dir)
    later = datetime.now(UTC) + timedelta(days=1)
    apply_retention(store, list(before.values()), RetentionPolicy(bronze_days=1), later)
    bronze = store.open("bronze", "docs")
    assert bronze is not None
    bronze.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    stale_copy = {"id": "a", "ts": ts, "rev": 5, "kw": 2.0}  # an older revision, late
    land_records(settings.data_dir, "docs", [stale_copy, {"id": "b", "ts": ts, "rev": 1,
                                                          "kw": 3.0}])  # fmt: skip
    assert Processor(settings, before).run_once().failures == []
    assert _read(settings, "silver/docs").sort("id").select("id", "rev").rows() == [
        ("a", 10),
        ("b", 1),
    ]

    after = _docs(tmp_path, with_note=False)  # the contract drops `note`
    refresh(store, after["docs"], "silver")
    silver = _read(settings, "silver/docs").sort("id")
    assert silver.select("id", "rev", "kw").rows() == [("a", 10, 1.0), ("b", 1, 3.0)]
    assert "note" not in silver.columns
    land_records(settings.data_dir, "docs", [{"id": "c", "ts": ts, "rev": 1, "kw": 4.0}])
    assert Processor(settings, after).run_once().failures == []
    assert sorted(_read(settings, "silver/docs")["id"].to_list()) == ["a", "b", "c"]


def test_a_stored_gold_table_that_no_longer_fits_keeps_nothing_and_fails_nothing(
    tmp_path: Path,
) -> None:
    """A gold definition changed (here: a column added to group_by) after silver lost
    rows: the old rows cannot be told apart, so the rebuild keeps none of them instead
    of failing on every try (the processor would retry it forever)."""
    contract = _meters(tmp_path)
    daily = next(s for s in contract.gold if s.name == "meters_daily")
    regrouped = daily.model_copy(update={"group_by": ["meter", "site"]})
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rebuilt = pl.DataFrame({"meter": ["m1"], "site": ["s"], "window_start": [start],
                            "count": [1], "sum": [2.0]})  # fmt: skip
    stored = pl.DataFrame({"meter": ["m1"], "window_start": [start - timedelta(days=9)],
                           "count": [3], "sum": [4.0]})  # fmt: skip
    kept = kept_past_horizon(rebuilt, stored, regrouped, contract, start)
    assert kept.equals(rebuilt)
    # The same stored row, with the definition it was made by, is kept.
    with_site = stored.with_columns(pl.lit("s").alias("site"))
    assert kept_past_horizon(rebuilt, with_site, regrouped, contract, start).height == 2
