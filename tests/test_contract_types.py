"""Contract types (date, decimal, json) and the sequence column deciding which version wins."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from config.contracts import ContractError, load_contract_file, load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from tests.helpers import land_records

METERS = """
name = "meters"
keys = ["meter"]
event_time = "at"
sequence = "version"

[[fields]]
name = "meter"
type = "string"

[[fields]]
name = "at"
type = "timestamp"
required = true

[[fields]]
name = "version"
type = "int"
required = true

[[fields]]
name = "day"
type = "date"

[[fields]]
name = "amount"
type = "decimal"
precision = 8
scale = 2

[[fields]]
name = "payload"
type = "json"
"""


@pytest.fixture
def contracts_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "contracts"
    directory.mkdir()
    (directory / "meters.toml").write_text(METERS)
    return directory


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "meters", rows)


def _silver(settings: Settings) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / "silver" / "meters")).sort("meter")


def _row(meter: str, version: int, amount: str, **extra: object) -> dict[str, object]:
    return {"meter": meter, "at": "2026-11-20T10:00:00Z", "version": version, "amount": amount,
            **extra}  # fmt: skip


def test_greatest_sequence_wins_whatever_the_arrival_order(
    settings: Settings, contracts_dir: Path
) -> None:
    processor = Processor(settings, load_contracts(contracts_dir))
    _send(settings, [_row("a", 2, "5"), _row("b", 3, "1"), _row("b", 1, "2")])  # b: v3 first
    processor.run_once()
    _send(settings, [_row("a", 1, "9")])  # late and older: must not win
    processor.run_once()
    silver = _silver(settings)
    assert silver.select("meter", "version", "amount").rows() == [
        ("a", 2, Decimal("5.00")),
        ("b", 3, Decimal("1.00")),
    ]
    _send(settings, [_row("a", 2, "7")])  # same sequence, later arrival: wins (deterministic)
    _send(settings, [_row("b", 4, "8"), _row("b", 4, "6")])  # tie inside a batch: last wins
    processor.run_once()
    assert _silver(settings).select("meter", "version", "amount").rows() == [
        ("a", 2, Decimal("7.00")),
        ("b", 4, Decimal("6.00")),
    ]


def test_date_decimal_and_json_fields(settings: Settings, contracts_dir: Path) -> None:
    _send(
        settings,
        [
            _row("ok", 1, "12.346", day="2026-11-20", payload={"k": [1, 2]}),
            _row("ts-day", 1, "-3", day="2026-11-20T23:30:00-02:00", payload="plain text"),
            _row("bad-day", 1, "1", day="2026-13-01"),
            _row("too-big", 1, "12345678.9"),
            _row("no-version", 1, "1") | {"version": "v2"},
        ],
    )
    Processor(settings, load_contracts(contracts_dir)).run_once()
    silver = _silver(settings)
    assert silver.schema["amount"] == pl.Decimal(8, 2)
    assert silver.schema["day"] == pl.Date
    rows = {r["meter"]: r for r in silver.iter_rows(named=True)}
    assert set(rows) == {"ok", "ts-day"}
    assert rows["ok"]["amount"] == Decimal("12.35")
    assert rows["ok"]["day"] == date(2026, 11, 20)
    assert json.loads(rows["ok"]["payload"]) == {"k": [1, 2]}
    assert rows["ts-day"]["day"] == date(2026, 11, 21)  # the UTC date
    assert json.loads(rows["ts-day"]["payload"]) == "plain text"
    assert rows["ok"]["at"] == datetime(2026, 11, 20, 10, tzinfo=UTC)
    reasons = pl.read_delta(str(settings.data_dir / "quarantine" / "meters"))
    assert sorted(reasons["_reason"].to_list()) == [
        "amount: cannot parse '12345678.9' as decimal",
        "day: cannot parse '2026-13-01' as date",
        "version: cannot parse 'v2' as int",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('sequence = "version"', 'sequence = "payload"'), "sequence 'payload' must be"),
        (('name = "version"\ntype = "int"\nrequired = true', 'name = "version"\ntype = "int"'),
         "sequence 'version' must be required"),
        (("precision = 8\n", ""), "needs a precision"),
        (("scale = 2", "scale = 9"), "scale exceeds precision"),
    ],
)  # fmt: skip
def test_contract_rules_for_sequence_and_decimals(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "meters.toml"
    assert change[0] in METERS
    path.write_text(METERS.replace(change[0], change[1]))
    with pytest.raises(ContractError, match=message):
        load_contract_file(path)
