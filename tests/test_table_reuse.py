"""``TableStore.reusing_tables``: the processor's open tables are brought up to date,
never served stale, never shared between threads."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from delta_processing.tables import RELOAD_AFTER_COMMITS, TableStore, table_columns


def _commit(root: Path, values: list[int], **options: object) -> None:
    write_deltalake(str(root / "silver" / "t"), pa.table({"v": values}), **options)  # type: ignore[arg-type]


def _values(table: DeltaTable) -> list[int]:
    return sorted(table.to_pyarrow_table().column("v").to_pylist())


def test_a_reused_table_sees_commits_made_elsewhere(tmp_path: Path) -> None:
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [1])
    first = store.open("silver", "t")
    assert first is not None and first.version() == 0
    _commit(tmp_path, [2], mode="append")  # another writer: not through this store
    again = store.open("silver", "t")
    assert again is first  # the same object, brought up to date
    assert again.version() == 1 and _values(again) == [1, 2]


def test_an_overwrite_with_a_new_schema_is_seen(tmp_path: Path) -> None:
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [1])
    assert store.open("silver", "t") is not None
    write_deltalake(
        str(tmp_path / "silver" / "t"),
        pa.table({"v": [5], "w": ["x"]}),
        mode="overwrite",
        schema_mode="overwrite",
    )
    table = store.open("silver", "t")
    assert table is not None and table_columns(table) == ["v", "w"] and _values(table) == [5]


def test_pinned_opens_move_to_their_version_and_leave_the_latest_alone(tmp_path: Path) -> None:
    store = TableStore(tmp_path).reusing_tables()
    for value in range(4):
        _commit(tmp_path, [value], mode="append")
    latest = store.open("silver", "t")
    assert latest is not None and latest.version() == 3
    for version in (1, 3, 2):
        pinned = store.open("silver", "t", version=version)
        assert pinned is not None and pinned.version() == version
        assert _values(pinned) == list(range(version + 1))
    assert latest.version() == 3 and store.open("silver", "t") is latest


def test_a_table_deleted_by_hand_is_not_served_from_memory(tmp_path: Path) -> None:
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [1])
    _commit(tmp_path, [2], mode="append")
    assert store.open("silver", "t") is not None
    shutil.rmtree(tmp_path / "silver" / "t")
    assert store.open("silver", "t") is None
    _commit(tmp_path, [7])  # re-created: version 0 again
    table = store.open("silver", "t")
    assert table is not None and table.version() == 0 and _values(table) == [7]


def test_a_failed_update_loads_the_table_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [1])
    first = store.open("silver", "t")
    _commit(tmp_path, [2], mode="append")

    def broken(self: DeltaTable) -> None:
        raise OSError("log listing failed")

    monkeypatch.setattr(DeltaTable, "update_incremental", broken)
    table = store.open("silver", "t")
    assert table is not None and table is not first and table.version() == 1


def test_threads_never_share_a_table_object(tmp_path: Path) -> None:
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [1])
    mine = store.open("silver", "t")
    theirs: list[DeltaTable | None] = []
    worker = threading.Thread(target=lambda: theirs.append(store.open("silver", "t")))
    worker.start()
    worker.join()
    assert mine is not None and theirs[0] is not None and theirs[0] is not mine
    assert store.open("silver", "t") is mine


def test_a_plain_store_loads_every_time(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    _commit(tmp_path, [1])
    assert store.open("silver", "t") is not store.open("silver", "t")


def test_an_object_that_moved_through_many_commits_is_loaded_afresh(tmp_path: Path) -> None:
    """deltalake's object slows down with every commit it moves through (each write
    through it costs more): after RELOAD_AFTER_COMMITS the store loads the table anew."""
    store = TableStore(tmp_path).reusing_tables()
    _commit(tmp_path, [0])
    first = store.open("silver", "t")
    assert first is not None
    for n in range(1, RELOAD_AFTER_COMMITS):
        table = store.open("silver", "t")
        assert table is first  # reused while it is young
        write_deltalake(table, pa.table({"v": [n]}), mode="append")
    worn = store.open("silver", "t")
    assert worn is first and worn.version() == RELOAD_AFTER_COMMITS - 1
    write_deltalake(worn, pa.table({"v": [RELOAD_AFTER_COMMITS]}), mode="append")
    fresh = store.open("silver", "t")
    assert fresh is not None and fresh is not first
    assert fresh.version() == RELOAD_AFTER_COMMITS
    assert _values(fresh) == list(range(RELOAD_AFTER_COMMITS + 1))
    assert store.open("silver", "t") is fresh  # and then reused again
    # A pinned object far from where it was loaded is loaded afresh at its version too.
    pinned = store.open("silver", "t", version=0)
    assert pinned is not None and store.open("silver", "t", version=1) is pinned
    far = store.open("silver", "t", version=RELOAD_AFTER_COMMITS)
    assert far is not None and far is not pinned and far.version() == RELOAD_AFTER_COMMITS
