"""Settings, contracts and the `lakehouse` CLI, run as the user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from config.contracts import ContractError, load_contract_file, load_contracts
from config.settings import SettingsError, load_settings
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env


def _cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAKEHOUSE, *args],
        cwd=REPO,
        env=lakehouse_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKEHOUSE_API_PORT", "99999")
    monkeypatch.setenv("LAKEHOUSE_BATCH_MAX_FILES", "zero")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "LAKEHOUSE_API_PORT (='99999')" in message
    assert "LAKEHOUSE_BATCH_MAX_FILES (='zero')" in message


def test_settings_come_from_a_toml_file_and_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "lakehouse.toml"
    config.write_text('api_port = 9100\ndata_dir = "/srv/lake"\n')
    monkeypatch.setenv("LAKEHOUSE_CONFIG_FILE", str(config))
    monkeypatch.setenv("LAKEHOUSE_API_PORT", "9200")
    settings = load_settings()
    assert settings.api_port == 9200
    assert settings.data_dir == Path("/srv/lake")
    monkeypatch.setenv("LAKEHOUSE_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        load_settings()


def test_cli_exits_2_with_the_setting_named(tmp_path: Path) -> None:
    result = _cli(tmp_path, "tables", LAKEHOUSE_TRIGGER_LATENCY_MS="-5")
    assert result.returncode == 2
    assert "LAKEHOUSE_TRIGGER_LATENCY_MS" in result.stderr


def test_builtin_readings_contract() -> None:
    readings = load_contracts()["readings"]
    assert readings.keys == ["device_id", "sensor", "ts"]
    assert readings.field_types == {
        "ts": "timestamp",
        "device_id": "string",
        "sensor": "string",
        "value": "float",
        "unit": "string",
    }
    assert readings.required_fields == ["ts", "device_id", "sensor", "value"]
    assert [g.name for g in readings.gold] == [
        "readings_hourly",
        "readings_daily",
        "readings_latest",
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name = \n", "invalid TOML"),
        (
            'name = "bad"\nkeys = ["nope"]\nevent_time = "ts"\n'
            '[[fields]]\nname = "ts"\ntype = "timestamp"\n',
            "key column 'nope' is not a declared field",
        ),
        (
            'name = "bad"\nkeys = ["ts"]\nevent_time = "ts"\n'
            '[[fields]]\nname = "ts"\ntype = "uuid"\n',
            "fields.0.type",
        ),
        (
            'name = "bad"\nkeys = ["ts"]\nevent_time = "ts"\n'
            '[[fields]]\nname = "ts"\ntype = "timestamp"\n'
            '[[fields]]\nname = "site"\ntype = "string"\n'
            '[[fields]]\nname = "v"\ntype = "float"\n'
            '[[gold]]\nname = "g"\nkind = "latest"\ngroup_by = ["site"]\nvalue = "v"\n',
            "groups by 'site', which must be required",
        ),
        (
            'name = "other"\nkeys = ["ts"]\nevent_time = "ts"\n'
            '[[fields]]\nname = "ts"\ntype = "timestamp"\n',
            "must match the file name",
        ),
    ],
)
def test_contract_errors_name_file_and_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ContractError) as info:
        load_contract_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_tokens_create_prints_only_the_secret(tmp_path: Path) -> None:
    result = _cli(tmp_path, "tokens", "create", "ci", "--scope", "ingest:readings", "-s", "query")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lh_") and len(lines[0]) > 40
    stored = (tmp_path / "_meta" / "tokens.json").read_text()
    assert lines[0] not in stored  # only the hash is kept
    assert json.loads(stored)["tokens"][0]["scopes"] == ["ingest:readings", "query"]
    duplicate = _cli(tmp_path, "tokens", "create", "ci", "--scope", "query")
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    bad = _cli(tmp_path, "tokens", "create", "x", "--scope", "ingest:../etc")
    assert bad.returncode == 2 and "invalid scope" in bad.stderr
    listing = _cli(tmp_path, "tokens", "list")
    assert "ci" in listing.stdout and lines[0] not in listing.stdout


def test_process_once_then_sql_and_tables(tmp_path: Path) -> None:
    landing = tmp_path / "landing" / "readings"
    landing.mkdir(parents=True)
    (landing / "drop.csv").write_text(
        "ts,device_id,sensor,value\n2026-11-20T10:00:00Z,d1,t,1.5\n2026-11-20T10:30:00Z,d1,t,2.5\n"
    )
    processed = _cli(tmp_path, "process", "--once")
    assert processed.returncode == 0, processed.stderr

    as_json = _cli(
        tmp_path,
        "sql",
        "SELECT device_id, count, sum FROM gold.readings_hourly",
        "--format",
        "json",
    )
    assert json.loads(as_json.stdout) == [{"device_id": "d1", "count": 2, "sum": 4.0}]
    as_csv = _cli(tmp_path, "sql", "SELECT sensor, avg FROM gold.readings_daily", "-f", "csv")
    assert as_csv.stdout.splitlines() == ["sensor,avg", "t,2.0"]
    refused = _cli(tmp_path, "sql", "COPY gold.readings_daily TO '/tmp/out.csv'")
    assert refused.returncode == 1 and "only SELECT" in refused.stderr

    listing = _cli(tmp_path, "tables")
    for name in ("bronze.readings", "silver.readings", "gold.readings_hourly"):
        assert name in listing.stdout


def test_dotenv_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("LAKEHOUSE_QUERY_MAX_ROWS=123\nLAKEHOUSE_LOG_LEVEL=DEBUG\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.query_max_rows, settings.log_level) == (123, "DEBUG")


def test_sources_validate_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    contracts = tmp_path / "contracts"
    contracts.mkdir()
    (contracts / "bad.toml").write_text(
        'name = "bad"\nkeys = ["ts"]\nevent_time = "ts"\n\n'
        '[[fields]]\nname = "ts"\ntype = "timestamp"\n\n'
        '[[fields]]\nname = "v"\ntype = "uuid"\n\n'
        '[[expectations]]\nname = "r"\nkind = "range"\ncolumn = "ts"\n'
    )
    (contracts / "broken.toml").write_text('name = "broken"\nkeys = [\n')
    (contracts / "sql.toml").write_text(
        'name = "sql"\nkeys = ["ts"]\nevent_time = "ts"\n'
        '[[fields]]\nname = "ts"\ntype = "timestamp"\n'
        '[[expectations]]\nname = "p"\nkind = "predicate"\npredicate = "missing > 1"\n'
    )
    result = _cli(tmp_path, "sources", "validate", LAKEHOUSE_CONTRACTS_DIR=str(contracts))
    assert result.returncode == 1
    errors = result.stderr
    assert f"{contracts / 'bad.toml'}:11: fields.1.type: Input should be" in errors
    assert f"{contracts / 'bad.toml'}:13: expectations.0: range expectation 'r' needs" in errors
    assert f"{contracts / 'broken.toml'}:3: invalid TOML" in errors
    assert "expectation 'p' cannot run" in errors

    good = _cli(tmp_path, "sources", "validate")
    assert good.returncode == 0 and "1 contract file(s) valid" in good.stdout
    listing = _cli(tmp_path, "sources")
    assert "readings" in listing.stdout and "readings_hourly" in listing.stdout


def test_quality_command_shows_batches(tmp_path: Path) -> None:
    landing = tmp_path / "landing" / "readings"
    landing.mkdir(parents=True)
    (landing / "a.csv").write_text(
        "ts,device_id,sensor,value\n2026-11-20T10:00:00Z,d,t,1\nx,d,t,2\n"
    )
    assert _cli(tmp_path, "process", "--once").returncode == 0
    result = _cli(tmp_path, "quality", "readings")
    assert result.returncode == 0, result.stderr
    assert "readings" in result.stdout and "_contract=1" in result.stdout.replace("\n", "")


def test_gold_names_must_be_unique_across_sources(tmp_path: Path) -> None:
    contracts = tmp_path / "contracts"
    contracts.mkdir()
    builtin = (REPO / "config" / "sources" / "readings.toml").read_text()
    (contracts / "readings2.toml").write_text(
        builtin.replace('name = "readings"', 'name = "readings2"')
    )
    with pytest.raises(ContractError, match="'readings_hourly' is declared by both"):
        load_contracts(contracts)
    result = _cli(tmp_path, "sources", "validate", LAKEHOUSE_CONTRACTS_DIR=str(contracts))
    assert result.returncode == 1 and "declared by both 'readings' and 'readings2'" in result.stderr


def test_latest_tables_cannot_group_by_their_time_or_value(tmp_path: Path) -> None:
    path = tmp_path / "readings.toml"
    text = (REPO / "config" / "sources" / "readings.toml").read_text()
    path.write_text(text.replace('kind = "latest"\ngroup_by = ["device_id", "sensor"]',
                                 'kind = "latest"\ngroup_by = ["device_id", "ts"]'))  # fmt: skip
    with pytest.raises(ContractError, match="cannot group by its event time"):
        load_contract_file(path)
