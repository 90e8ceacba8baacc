"""Declared gold tables: any window, every aggregate, and SQL gold per affected window."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from config.contracts import ContractError, load_contract_file, load_contracts
from config.settings import Settings
from delta_processing.gold import gold_frame
from delta_processing.processor import Processor
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

[[gold]]
name = "meters_15m"
kind = "window"
every = "15m"
group_by = ["meter"]
value = "v"
aggregates = ["count", "first", "last", "stddev", "p50", "p90", "min"]

[[gold]]
name = "meters_daily_sql"
kind = "sql"
every = "1d"
window_column = "day"
query = \"\"\"
SELECT meter, date_trunc('day', "at") AS day, count(*) AS n, sum(v) AS total, max(v) AS peak
FROM silver GROUP BY ALL
\"\"\"
"""


def _processor(tmp_path: Path, settings: Settings, contract: str = CONTRACT) -> Processor:
    directory = tmp_path / "contracts"
    directory.mkdir(exist_ok=True)
    (directory / "meters.toml").write_text(contract)
    return Processor(settings, load_contracts(directory))


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "meters", rows)


def _check_against_full_recomputation(settings: Settings, tmp_path: Path) -> None:
    contract = load_contracts(tmp_path / "contracts")["meters"]
    silver = pl.read_delta(str(settings.data_dir / "silver" / "meters"))
    for spec in contract.gold:
        expected = gold_frame(silver, spec, contract)
        got = pl.read_delta(str(settings.data_dir / "gold" / spec.name))
        keys = ["meter", "window_start" if "window_start" in expected.columns else "day"]
        assert_frame_equal(
            got.select(expected.columns).sort(keys), expected.sort(keys), check_exact=False
        )


def test_declared_gold_stays_equal_to_full_recomputation(
    settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(5)
    processor = _processor(tmp_path, settings)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    for _ in range(6):
        rows: list[dict[str, object]] = [
            {
                "meter": rng.choice(["m1", "m2", "m3"]),
                "at": (base + timedelta(minutes=rng.randint(0, 3 * 24 * 60))).isoformat(),
                "v": round(rng.uniform(0, 100), 2),
            }
            for _ in range(rng.randint(5, 60))
        ]
        rows += [dict(r, v=-1.0) for r in rng.sample(rows, 3)]  # corrections of same keys
        _send(settings, rows)
        report = processor.run_once()
        assert report.failures == []
        _check_against_full_recomputation(settings, tmp_path)
    window = pl.read_delta(str(settings.data_dir / "gold" / "meters_15m"))
    assert window.columns == ["meter", "window_start", "count", "first", "last", "stddev",
                              "p50", "p90", "min", "_window_date"]  # fmt: skip
    for name in ("meters_15m", "meters_daily_sql"):  # window tables, declared or SQL
        table = DeltaTable(str(settings.data_dir / "gold" / name))
        assert table.metadata().partition_columns == ["_window_date"]


def test_first_last_and_percentiles_by_event_time(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings)
    _send(
        settings,
        [
            {"meter": "m", "at": "2026-11-20T10:10:00Z", "v": 3.0},
            {"meter": "m", "at": "2026-11-20T10:01:00Z", "v": 1.0},
            {"meter": "m", "at": "2026-11-20T10:05:00Z", "v": 2.0},
            {"meter": "m", "at": "2026-11-20T10:14:00Z", "v": 10.0},
        ],
    )
    processor.run_once()
    row = pl.read_delta(str(settings.data_dir / "gold" / "meters_15m")).row(0, named=True)
    assert (row["count"], row["first"], row["last"], row["min"]) == (4, 1.0, 10.0, 1.0)
    assert row["p50"] == pytest.approx(2.5)
    assert row["stddev"] == pytest.approx(pl.Series([1.0, 2.0, 3.0, 10.0]).std())
    daily = pl.read_delta(str(settings.data_dir / "gold" / "meters_daily_sql")).row(0, named=True)
    assert (daily["n"], daily["total"], daily["peak"]) == (4, 16.0, 10.0)
    assert daily["day"] == datetime(2026, 11, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        pytest.param(
            "date_trunc('day', \"at\")",
            "date_trunc('month', \"at\")",
            "'day' must be the start of the 1d event-time window",
            id="wrong-window-column",
        ),
        pytest.param(
            "sum(v) AS total",
            "sum(nope) AS total",
            "gold 'meters_daily_sql': query failed",
            id="query-error",
        ),
        pytest.param(
            "max(v) AS peak",
            "max(v) AS _window_date",
            "'_window_date' is the partition column gold adds itself",
            id="partition-column",
        ),
    ],
)
def test_bad_sql_gold_is_reported(
    settings: Settings, tmp_path: Path, old: str, new: str, reported: str
) -> None:
    bad = CONTRACT.replace(old, new)
    assert bad != CONTRACT
    processor = _processor(tmp_path, settings, bad)
    _send(settings, [{"meter": "m", "at": "2026-11-20T10:10:00Z", "v": 3.0}])
    failures = processor.run_once().failures
    assert len(failures) == 1
    assert reported in failures[0]


def test_unknown_aggregates_are_contract_errors(tmp_path: Path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(CONTRACT.replace('"p90"', '"median"'))
    with pytest.raises(ContractError, match="unknown aggregate 'median'"):
        load_contract_file(path)
