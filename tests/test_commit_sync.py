"""Commit durability without listing the log: every commit a stage makes is fsynced,
found by the version the write left the table object at, never by listing ``_delta_log``
(which grows by a file per commit until maintenance cleans it)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

import delta_processing.silver as silver_module
import delta_processing.tables as tables_module
from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from delta_processing.quality import QUALITY_LAYER, QUALITY_TABLE, quality_app_id
from delta_processing.silver import QUARANTINE_APP_ID
from delta_processing.tables import (
    TableStore,
    append,
    commit_marker,
    latest_local_version,
    sync_latest_commit,
)
from tests.helpers import land_records

CONTRACT = """
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

[[expectations]]
name = "v_plausible"
kind = "range"
column = "v"
min = 0
max = 1000
action = "quarantine"

[[gold]]
name = "meters_hourly"
kind = "window"
every = "1h"
group_by = ["meter"]
value = "v"

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


def _log_versions(root: Path) -> set[int]:
    return {int(p.stem) for p in (root / "_delta_log").glob("*.json") if p.stem.isdigit()}


def _newest_by_listing(root: Path) -> int:
    return max(_log_versions(root))


def _processor(tmp_path: Path, settings: Settings) -> Processor:
    directory = tmp_path / "contracts"
    directory.mkdir(exist_ok=True)
    (directory / "meters.toml").write_text(CONTRACT)
    return Processor(settings, load_contracts(directory))


def _batch(step: int) -> list[dict[str, object]]:
    """Readings of one micro-batch: new instants, one late reading, one implausible."""
    at = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(minutes=10 * step)
    return [
        {"meter": "m1", "at": at.isoformat(), "v": float(step)},
        {"meter": "m2", "at": at.isoformat(), "v": float(step) + 0.5},
        {"meter": "m1", "at": (at - timedelta(hours=2)).isoformat(), "v": 1.0},  # late
        {"meter": "m3", "at": at.isoformat(), "v": 5000.0},  # quarantined
    ]


def _run(processor: Processor, settings: Settings, step: int) -> None:
    land_records(settings.data_dir, "meters", _batch(step))
    report = processor.run_once()
    assert report.failures == []
    assert report.silver and report.gold


@pytest.fixture
def log_listings(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Arms a spy on every Python-side directory listing; returns a getter of the listed
    ``_delta_log`` directories (deltalake's own Rust I/O is not Python and not seen)."""
    listed: list[str] = []
    armed = False

    def spy(real: Callable[..., Any], describe: Callable[..., str]) -> Callable[..., Any]:
        def listing(*args: Any, **kwargs: Any) -> Any:
            where = describe(*args, **kwargs)
            if armed and "_delta_log" in where:
                listed.append(where)
            return real(*args, **kwargs)

        return listing

    for name in ("glob", "rglob", "iterdir"):
        real = getattr(Path, name)
        monkeypatch.setattr(Path, name, spy(real, lambda self, *a, **k: f"{self}:{a}"))
    for name in ("listdir", "scandir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, spy(real, lambda path=".", *a, **k: str(path)))

    def arm() -> list[str]:
        nonlocal armed
        armed = True
        return listed

    return arm


@pytest.fixture
def latest_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of ``sync_latest_commit`` (the lookup of the newest commit by URI)."""
    calls: list[str] = []
    real = tables_module.sync_latest_commit

    def counting(table: str | DeltaTable) -> None:
        calls.append(table if isinstance(table, str) else table.table_uri)
        real(table)

    monkeypatch.setattr(tables_module, "sync_latest_commit", counting)
    return calls


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Path, list[int]]]:
    """Every ``sync_commit`` (table directory -> versions fsynced, in order), each checked
    at the call to name the newest commit of its table: the one just written."""
    calls: dict[Path, list[int]] = {}
    real = tables_module.sync_commit

    def recording(table: str | DeltaTable, version: int) -> None:
        root = tables_module.local_root(table)
        assert root is not None
        assert version == _newest_by_listing(root), f"{root}: fsynced {version}, not the newest"
        calls.setdefault(root, []).append(version)
        real(table, version)

    monkeypatch.setattr(tables_module, "sync_commit", recording)
    yield calls


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``DeltaTable.update_incremental`` (deltalake lists the whole log for it)."""
    calls: list[str] = []
    real = DeltaTable.update_incremental

    def counting(self: DeltaTable) -> None:
        calls.append(self.table_uri)
        real(self)

    monkeypatch.setattr(DeltaTable, "update_incremental", counting)
    return calls


def test_steady_state_promotions_never_list_the_log_nor_look_up_the_newest_commit(
    tmp_path: Path,
    settings: Settings,
    log_listings: Callable[[], list[str]],
    latest_lookups: list[str],
    refreshes: list[str],
) -> None:
    processor = _processor(tmp_path, settings)
    _run(processor, settings, 1)  # creates every table: by URI, found by lookup
    assert latest_lookups  # the creations (quality, quarantine, SQL gold)
    _run(processor, settings, 2)
    latest_lookups.clear()
    refreshes.clear()
    listed = log_listings()
    for step in range(3, 6):
        _run(processor, settings, step)
    assert listed == []
    assert latest_lookups == []
    # Every table the cycle opens again was last written through the reused object.
    assert refreshes == []


def test_a_reused_table_is_brought_up_to_date_only_when_a_newer_commit_exists(
    tmp_path: Path, refreshes: list[str]
) -> None:
    store = TableStore(tmp_path).reusing_tables()
    root = tmp_path / "silver" / "t"
    _commit(root, 0)
    first = store.open("silver", "t")
    assert first is not None
    assert store.open("silver", "t") is first and refreshes == []  # nothing new: no listing
    append(first, pl.DataFrame({"v": [1]}), commit_marker("app", 1))  # through the object
    assert store.open("silver", "t") is first and first.version() == 1 and refreshes == []
    _commit(root, 2)  # another writer
    again = store.open("silver", "t")
    assert again is first and again.version() == 2 and len(refreshes) == 1
    assert sorted(again.to_pyarrow_table().column("v").to_pylist()) == [0, 1, 2]


def test_every_commit_of_a_cycle_is_fsynced_at_the_version_it_made(
    tmp_path: Path, settings: Settings, synced: dict[Path, list[int]]
) -> None:
    processor = _processor(tmp_path, settings)
    data = settings.data_dir
    roots = [
        data / "bronze" / "meters",
        data / "silver" / "meters",
        data / "quarantine" / "meters",
        data / QUALITY_LAYER / QUALITY_TABLE,
        data / "gold" / "meters_hourly",
        data / "gold" / "meters_latest",
        data / "gold" / "meters_daily_sql",
    ]
    for step in range(1, 5):
        before = {root: _log_versions(root) if root.exists() else set() for root in roots}
        synced.clear()
        _run(processor, settings, step)
        for root in roots:
            made = _log_versions(root) - before[root]
            assert made, f"{root}: no commit in step {step}"
            # Each commit fsynced once, right after it was made (checked in the spy).
            assert sorted(synced.get(root, [])) == sorted(made), root


def test_appends_through_reused_tables_leave_them_current(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silver appends quality and quarantine rows through the store's reused objects:
    the write itself moves each to its new commit, with its positions, and the next
    ``open`` hands back the same object."""
    processor = _processor(tmp_path, settings)
    store = processor._silver._store  # the processor's reusing store (this thread's)
    appended: list[tuple[str | DeltaTable, int | None, int, int | None]] = []
    real_append = tables_module.append  # what silver imported

    def recording(target: str | DeltaTable, *args: Any, **kwargs: Any) -> None:
        real_append(target, *args, **kwargs)
        uri = target.table_uri if isinstance(target, DeltaTable) else target
        if "/silver/" in uri:
            return  # silver's own append (always through its table)
        if isinstance(target, DeltaTable):  # as the append left it, before any `open`
            root = tables_module.local_root(target)
            assert root is not None
            quarantine = root.parent.name == "quarantine"
            app_id = QUARANTINE_APP_ID if quarantine else quality_app_id("meters")
            recorded = args[1].app_transactions[0].version
            assert target.transaction_version(app_id) == recorded
            appended.append((target, target.version(), _newest_by_listing(root), recorded))
        else:
            appended.append((target, None, -1, None))

    monkeypatch.setattr(silver_module, "append", recording)
    _run(processor, settings, 1)  # creates quality and quarantine: by URI
    assert [type(target) for target, *_ in appended] == [str, str]
    for step in range(2, 5):
        appended.clear()
        held = {
            "quality": store.open(QUALITY_LAYER, QUALITY_TABLE),
            "quarantine": store.open("quarantine", "meters"),
        }
        _run(processor, settings, step)
        targets = [target for target, *_ in appended]
        assert targets == [held["quality"], held["quarantine"]]  # the reused objects
        for _, version, newest, _ in appended:
            assert version == newest
        assert store.open(QUALITY_LAYER, QUALITY_TABLE) is held["quality"]
        assert store.open("quarantine", "meters") is held["quarantine"]


def _commit(root: Path, value: int, **options: Any) -> None:
    write_deltalake(str(root), pa.table({"v": [value]}), mode="append", **options)


def test_the_newest_commit_is_found_after_a_checkpoint_and_without_one(tmp_path: Path) -> None:
    plain = tmp_path / "plain"  # never checkpointed: found from version 0
    for value in range(23):
        _commit(plain, value)
        assert latest_local_version(plain) == value
    checkpointed = tmp_path / "checkpointed"  # deltalake checkpoints every 5 commits
    _commit(checkpointed, 0, configuration={"delta.checkpointInterval": "5"})
    for value in range(1, 38):
        _commit(checkpointed, value)
        assert latest_local_version(checkpointed) == value == _newest_by_listing(checkpointed)
    pointer = json.loads((checkpointed / "_delta_log" / "_last_checkpoint").read_text())
    assert pointer["version"] == 34  # so three commits follow the checkpoint
    assert latest_local_version(tmp_path / "never-created") is None


def test_the_newest_commit_is_found_from_a_stale_or_missing_pointer_and_a_cleaned_log(
    tmp_path: Path,
) -> None:
    root = tmp_path / "t"
    _commit(root, 0, configuration={"delta.checkpointInterval": "10"})
    for value in range(1, 27):
        _commit(root, value)
    log_dir = root / "_delta_log"
    # A pointer left behind at an older checkpoint (it is only a hint).
    (log_dir / "_last_checkpoint").write_text(json.dumps({"version": 9, "size": 1}))
    assert latest_local_version(root) == 26
    # A torn pointer: from version 0.
    (log_dir / "_last_checkpoint").write_text('{"vers')
    assert latest_local_version(root) == 26
    # Log cleaned up to the checkpoint and no pointer: found by listing, still right.
    (log_dir / "_last_checkpoint").unlink()
    for version in range(19):
        (log_dir / f"{version:020d}.json").unlink()
    assert latest_local_version(root) == 26
    # Cleaned log with the pointer at its checkpoint: probes from there.
    (log_dir / "_last_checkpoint").write_text(json.dumps({"version": 19, "size": 1}))
    assert latest_local_version(root) == 26


def test_looking_up_the_newest_commit_probes_a_few_names_and_lists_nothing(
    tmp_path: Path, log_listings: Callable[[], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "t"
    _commit(root, 0, configuration={"delta.checkpointInterval": "1000"})  # no checkpoint
    for value in range(1, 300):
        _commit(root, value)
    probes: list[Path] = []
    real_exists = Path.exists

    def counting(self: Path, *args: Any, **kwargs: Any) -> bool:
        if self.suffix == ".json":
            probes.append(self)
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", counting)
    listed = log_listings()
    assert latest_local_version(root) == 299
    assert listed == []
    assert len(probes) <= 2 * 9 + 2  # doubling to 511, then halving back: not 300


def test_sync_latest_commit_fsyncs_the_newest_commit_and_leaves_object_storage_alone(
    tmp_path: Path, synced: dict[Path, list[int]]
) -> None:
    root = tmp_path / "t"
    _commit(root, 0, configuration={"delta.checkpointInterval": "4"})
    for value in range(1, 12):
        _commit(root, value)
    sync_latest_commit(str(root))
    sync_latest_commit(f"file://{root}/")
    assert synced == {root: [11, 11]}
    sync_latest_commit("az://container/never-touched")  # remote: nothing to do
    sync_latest_commit(str(tmp_path / "no-table"))  # nothing committed: nothing to do


def test_append_through_an_object_fsyncs_its_commit_without_a_lookup(
    tmp_path: Path, synced: dict[Path, list[int]], latest_lookups: list[str]
) -> None:
    root = tmp_path / "t"
    append(str(root), pl.DataFrame({"v": [0]}), commit_marker("app", 0))  # creates it
    assert synced == {root: [0]} and len(latest_lookups) == 1
    table = DeltaTable(str(root))
    latest_lookups.clear()
    for version in range(1, 4):
        frame = pl.DataFrame({"v": [version], "w": [str(version)]})
        append(table, frame, commit_marker("app", version), evolve_schema=True)
        assert table.version() == version and table.transaction_version("app") == version
    assert synced == {root: [0, 1, 2, 3]} and latest_lookups == []
