"""Full refresh of silver and gold, protected tables, and backfill of a bronze range."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.gold import gold_frame
from delta_processing.processor import Processor, ProcessorLock
from delta_processing.refresh import RefreshRefused, backfill, refresh
from delta_processing.tables import TableStore
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, land_records

CONTRACT = """
name = "loads"
keys = ["id"]
event_time = "ts"
protected = [{protected}]

[[fields]]
name = "id"
type = "string"

[[fields]]
name = "ts"
type = "timestamp"
required = true

[[fields]]
name = "kw"
type = "{kw_type}"
required = true

[[expectations]]
name = "small"
kind = "range"
column = "kw"
max = {kw_max}

[[gold]]
name = "loads_daily"
kind = "window"
every = "1d"
group_by = ["id"]
value = "kw"
"""


def _contracts(tmp_path: Path, kw_type: str = "float", kw_max: int = 10, protected: str = ""):
    directory = tmp_path / f"c-{kw_type}-{kw_max}-{len(protected)}"
    directory.mkdir(exist_ok=True)
    (directory / "loads.toml").write_text(
        CONTRACT.format(kw_type=kw_type, kw_max=kw_max, protected=protected)
    )
    return load_contracts(directory)


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "loads", rows)


def _rows(values: list[float]) -> list[dict[str, object]]:
    return [{"id": f"m{i}", "ts": "2026-11-20T10:00:00Z", "kw": v} for i, v in enumerate(values)]


def _read(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def test_refresh_silver_after_an_unsafe_contract_change_then_carry_on(
    settings: Settings, tmp_path: Path
) -> None:
    _send(settings, _rows([1.5, 2.0]))
    Processor(settings, _contracts(tmp_path)).run_once()
    base = _contracts(tmp_path)["loads"]
    fields = [f.model_copy(update={"type": "string"}) if f.name == "kw" else f for f in base.fields]
    as_text = base.model_copy(update={"fields": fields, "expectations": [], "gold": []})
    _send(settings, _rows([3.0]))
    failures = Processor(settings, load_contracts_for(as_text, tmp_path)).run_once().failures
    assert failures and "lakehouse refresh silver/loads" in failures[0]

    store = TableStore(settings.data_dir)
    result = refresh(store, as_text, "silver")
    assert result.table == "silver/loads" and result.rows == 2  # m0, m1 (m0 re-sent)
    silver = _read(settings, "silver/loads").sort("id")
    assert silver.schema["kw"] == pl.String
    assert silver.select("id", "kw").rows() == [("m0", "3.0"), ("m1", "2.0")]
    # The incremental pipeline continues from the rebuilt table.
    _send(settings, _rows([9.0, 9.5, 7.25]))
    assert Processor(settings, load_contracts_for(as_text, tmp_path)).run_once().failures == []
    assert sorted(_read(settings, "silver/loads")["kw"].to_list()) == ["7.25", "9.0", "9.5"]


def load_contracts_for(contract, tmp_path: Path):
    """A registry holding exactly ``contract`` (written back out as TOML is not needed)."""
    from config.contracts import ContractRegistry

    return ContractRegistry({contract.name: contract})


def test_refresh_gold_restores_it_and_protected_tables_are_refused(
    settings: Settings, tmp_path: Path
) -> None:
    contracts = _contracts(tmp_path)
    _send(settings, _rows([1.0, 2.0, 3.0]))
    Processor(settings, contracts).run_once()
    gold_path = str(settings.data_dir / "gold" / "loads_daily")
    # Damage gold behind the pipeline's back.
    pl.DataFrame(schema=_read(settings, "gold/loads_daily").schema).write_delta(
        gold_path, mode="overwrite"
    )
    store = TableStore(settings.data_dir)
    assert refresh(store, contracts["loads"], "loads_daily").rows == 3
    expected = gold_frame(_read(settings, "silver/loads"), contracts["loads"].gold[0],
                          contracts["loads"])  # fmt: skip
    assert_frame_equal(_read(settings, "gold/loads_daily").sort("id"), expected.sort("id"))

    guarded = _contracts(tmp_path, protected='"silver", "loads_daily"')["loads"]
    for table in ("silver", "loads_daily"):
        with pytest.raises(RefreshRefused, match="is protected"):
            refresh(store, guarded, table)
    with pytest.raises(RefreshRefused, match="has no table 'nope'"):
        refresh(store, contracts["loads"], "nope")


def test_backfill_rejudges_a_range_against_the_fixed_contract(
    settings: Settings, tmp_path: Path
) -> None:
    strict = _contracts(tmp_path, kw_max=4)
    _send(settings, _rows([1.0, 5.0, 7.0]))
    Processor(settings, strict).run_once()
    assert _read(settings, "silver/loads")["id"].to_list() == ["m0"]
    assert _read(settings, "quarantine/loads").height == 2

    relaxed = _contracts(tmp_path, kw_max=10)
    now = datetime.now(UTC)
    result = backfill(TableStore(settings.data_dir), relaxed["loads"], now - timedelta(hours=1),
                      now + timedelta(hours=1))  # fmt: skip
    assert result.rows == 3
    assert sorted(_read(settings, "silver/loads")["id"].to_list()) == ["m0", "m1", "m2"]
    assert _read(settings, "quarantine/loads").height == 0
    # Gold follows through the silver change feed.
    Processor(settings, relaxed).run_once()
    assert _read(settings, "gold/loads_daily")["sum"].sort().to_list() == [1.0, 5.0, 7.0]


def test_backfill_with_a_stricter_contract_takes_the_new_rejects_out_of_silver(
    settings: Settings, tmp_path: Path
) -> None:
    """A row that passed once and fails the stricter contract used to stay in silver
    (and be in quarantine too)."""
    relaxed, strict = _contracts(tmp_path, kw_max=10), _contracts(tmp_path, kw_max=4)
    _send(settings, _rows([1.0, 5.0, 7.0]))
    Processor(settings, relaxed).run_once()
    assert _read(settings, "silver/loads").height == 3
    now = datetime.now(UTC)

    result = backfill(TableStore(settings.data_dir), strict["loads"], now - timedelta(hours=1),
                      now + timedelta(hours=1))  # fmt: skip

    assert result.rows == 1
    assert _read(settings, "silver/loads")["id"].to_list() == ["m0"]
    assert sorted(_read(settings, "quarantine/loads")["id"].to_list()) == ["m1", "m2"]
    # Gold follows through the silver change feed (the deletes included).
    Processor(settings, strict).run_once()
    gold = _read(settings, "gold/loads_daily")
    assert gold["id"].to_list() == ["m0"] and gold["sum"].to_list() == [1.0]


def test_backfill_falls_back_to_an_earlier_copy_that_still_passes(
    settings: Settings, tmp_path: Path
) -> None:
    relaxed, strict = _contracts(tmp_path, kw_max=10), _contracts(tmp_path, kw_max=4)
    _send(settings, [{"id": "m0", "ts": "2026-11-20T10:00:00Z", "kw": 2.0}])
    Processor(settings, relaxed).run_once()
    between = datetime.now(UTC)
    _send(settings, [{"id": "m0", "ts": "2026-11-20T10:00:00Z", "kw": 6.0}])  # a correction
    Processor(settings, relaxed).run_once()
    assert _read(settings, "silver/loads")["kw"].to_list() == [6.0]

    # Only the correction is judged again, and fails: the earlier copy is m0 again.
    backfill(TableStore(settings.data_dir), strict["loads"], between,
             datetime.now(UTC) + timedelta(hours=1))  # fmt: skip

    assert _read(settings, "silver/loads").select("id", "kw").rows() == [("m0", 2.0)]
    assert _read(settings, "quarantine/loads")["kw"].to_list() == ["6.0"]
    Processor(settings, strict).run_once()
    assert _read(settings, "gold/loads_daily")["sum"].to_list() == [2.0]


def test_backfill_replaces_a_copy_that_fails_typing_by_the_one_that_passes(
    settings: Settings, tmp_path: Path
) -> None:
    """Both copies of m0 are in the range; the later one no longer types: the earlier
    one is silver's row again (it used to lose to the stored copy's later arrival)."""
    relaxed = _contracts(tmp_path)
    start = datetime.now(UTC)
    for kw in (2.0, 6.5):
        _send(settings, [{"id": "m0", "ts": "2026-11-20T10:00:00Z", "kw": kw}])
        Processor(settings, relaxed).run_once()
    as_int = _contracts(tmp_path, kw_type="int")

    backfill(TableStore(settings.data_dir), as_int["loads"], start - timedelta(seconds=1),
             datetime.now(UTC) + timedelta(hours=1))  # fmt: skip

    assert _read(settings, "silver/loads").select("id", "kw").rows() == [("m0", 2)]
    assert _read(settings, "quarantine/loads")["kw"].to_list() == ["6.5"]


def test_refresh_and_backfill_commands_respect_the_processor_lock(tmp_path: Path) -> None:
    data_dir = tmp_path / "dados"
    contracts_dir = tmp_path / "c"
    contracts_dir.mkdir()
    (contracts_dir / "loads.toml").write_text(CONTRACT.format(kw_type="float", kw_max=10,
                                                              protected=""))  # fmt: skip
    env = lakehouse_env(data_dir, LAKEHOUSE_CONTRACTS_DIR=str(contracts_dir))
    landing = data_dir / "landing" / "loads"
    landing.mkdir(parents=True)
    (landing / "a.ndjson").write_text("\n".join(json.dumps(r) for r in _rows([1.0, 2.0])))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LAKEHOUSE, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert cli("process", "--once").returncode == 0
    lock = ProcessorLock(data_dir)
    lock.acquire()
    try:
        busy = cli("refresh", "silver/loads")
        assert busy.returncode == 1 and "only one may run" in busy.stderr
    finally:
        lock.release()
    done = cli("refresh", "gold/loads_daily")
    assert done.returncode == 0 and "rebuilt gold/loads_daily: 2 row(s)" in done.stdout
    filled = cli("backfill", "loads", "--from", "2000-01-01", "--to", "2100-01-01")
    assert filled.returncode == 0 and "backfilled loads: 2 row(s)" in filled.stdout
    assert cli("refresh", "bronze/loads").returncode == 2


def test_refresh_silver_still_works_after_bronze_history_was_vacuumed(
    settings: Settings, tmp_path: Path
) -> None:
    from deltalake import DeltaTable

    from delta_processing.maintenance import MaintenancePolicy, compact, vacuum

    contracts = _contracts(tmp_path)
    processor = Processor(settings, contracts)
    for values in ([1.0, 2.0], [3.0], [4.0, 5.0]):
        _send(settings, _rows(values))
        processor.run_once()
    bronze_uri = str(settings.data_dir / "bronze" / "loads")
    policy = MaintenancePolicy(min_files_to_compact=2, vacuum_retention=timedelta(0))
    compact(DeltaTable(bronze_uri), policy)
    vacuum(DeltaTable(bronze_uri), policy, dry_run=False, allow_below_table_minimum=True)
    from delta_processing.tables import read_changes

    with pytest.raises(Exception, match=r"(?i)not found"):  # the change feed is gone
        read_changes(DeltaTable(bronze_uri), 0, DeltaTable(bronze_uri).version())
    store = TableStore(settings.data_dir)
    result = refresh(store, contracts["loads"], "silver")
    assert result.rows == 2  # m0 and m1: later sends replace earlier ones by arrival
    silver = _read(settings, "silver/loads").sort("id")
    assert silver.select("id", "kw").rows() == [("m0", 4.0), ("m1", 5.0)]
