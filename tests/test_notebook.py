"""Every notebook in ``notebooks/`` runs end to end against a real (small) lakehouse.

Notebooks are executed headless with nbclient in a kernel started from *this*
interpreter (the venv's python): a kernelspec pointing at ``sys.executable`` is
written into a temporary directory under a unique name and put first on
``JUPYTER_PATH``, so no kernelspec installed on the machine (user, system or another
venv) can be picked. Any cell error fails the test.

The notebooks are discovered by glob, so a new notebook is covered automatically:
it must run cleanly on the filled lakehouse and on an empty data directory, be
saved without outputs, and print something. The ones below also have their key
outputs checked against what the test landed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import polars as pl
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

import config
import delta_processing
import landing_zone
from landing_zone import LandingLayout, LandingWriter
from tests.helpers import REPO, lakehouse_env, land_records

NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
NOTEBOOK = NOTEBOOKS_DIR / "01_gold_overview.ipynb"
QUALITY_NOTEBOOK = NOTEBOOKS_DIR / "02_data_quality.ipynb"
COOKBOOK_NOTEBOOK = NOTEBOOKS_DIR / "03_duckdb_sql_cookbook.ipynb"
KERNEL_NAME = "lakehouse-test-python"
DEVICES = ["nb-device-alpha", "nb-device-beta"]
SENSORS = ["temperature", "humidity"]
EMPTY_MARKER = "has no gold readings yet"
START = datetime(2024, 5, 1, tzinfo=UTC)
READINGS_PER_SERIES = 36 * 6  # 36 hours, one reading every 10 minutes
LAST_READING_AT = "2024-05-02 11:50:00"  # START + 215 * 10 minutes

# Rows the readings contract rejects into quarantine.readings (types and presence).
BAD_READINGS: list[dict[str, object]] = [
    {"ts": "not a time", "device_id": DEVICES[0], "sensor": "temperature", "value": 1.0},
    {"ts": "yesterday-ish", "device_id": DEVICES[1], "sensor": "humidity", "value": 2.0},
    {"ts": "2024-05-01T00:05:00Z", "sensor": "temperature", "value": 3.0},
    {"ts": "2024-05-01T00:06:00Z", "device_id": DEVICES[0], "value": 4.0},
    {"ts": "2024-05-01T00:07:00Z", "device_id": DEVICES[1], "sensor": "humidity", "value": "hot"},
]

# A second source with expectations of every non-failing action.
METERS_CONTRACT = """
name = "meters"
keys = ["meter_id", "ts"]
event_time = "ts"

[[fields]]
name = "ts"
type = "timestamp"
required = true

[[fields]]
name = "meter_id"
type = "string"
required = true

[[fields]]
name = "kwh"
type = "float"
required = true

[[fields]]
name = "site"
type = "string"

[[expectations]]
name = "kwh_plausible"
kind = "range"
column = "kwh"
min = 0
max = 1000
action = "quarantine"

[[expectations]]
name = "known_site"
kind = "allowed"
column = "site"
values = ["north", "south"]
action = "drop"

[[expectations]]
name = "meter_id_format"
kind = "regex"
column = "meter_id"
pattern = "^M-[0-9]{3}$"
action = "warn"
"""


def meter(i: int, kwh: object, site: str = "north", meter_id: str = "M-001") -> dict[str, object]:
    ts = (START + timedelta(minutes=15 * i)).isoformat()
    return {"ts": ts, "meter_id": meter_id, "kwh": kwh, "site": site}


METER_ROWS = [
    *(meter(i, 10.0 + i) for i in range(6)),  # passed
    meter(6, 12.5, meter_id="meter-7"),  # warned (meter_id_format), still passed
    meter(7, 11.0, site="east"),  # dropped (known_site)
    meter(8, -5.0),  # quarantined (kwh_plausible)
    meter(9, 5000.0),  # quarantined (kwh_plausible)
    meter(10, "lots"),  # quarantined (contract: kwh cannot be parsed)
]
QUARANTINED = {"readings": len(BAD_READINGS), "meters": 3}
DEAD_LETTERS = pl.DataFrame(
    {
        "origin": ["mqtt"],
        "topic": ["tele/f2-AABBCCDDEEFF/sensor/1/temp"],
        "payload_base64": ["/wD+"],  # b"\xff\x00\xfe": not JSON
        "error": ["payload is not valid JSON (nb-dead-letter)"],
        "received_at": ["2024-05-02T12:00:00+00:00"],
    }
)


@pytest.fixture
def kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec for the running interpreter, visible only to this test."""
    jupyter_path = tmp_path / "jupyter"
    write_kernel_spec(jupyter_path / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    # A fresh IPython profile: no user startup files run in the kernel.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL_NAME


def readings_ndjson() -> bytes:
    lines = []
    for d, device in enumerate(DEVICES):
        for s, sensor in enumerate(SENSORS):
            for i in range(READINGS_PER_SERIES):
                value = 20.0 + 5 * d + 10 * s + (i % 12) * 0.5 + (i // 6) * 0.1
                record = {
                    "ts": (START + timedelta(minutes=10 * i)).isoformat(),
                    "device_id": device,
                    "sensor": sensor,
                    "value": value,
                    "unit": "C" if sensor == "temperature" else "%",
                }
                lines.append(json.dumps(record))
    return "\n".join(lines).encode()


def build_lakehouse(data_dir: Path, ndjson: bytes | None = None) -> None:
    frame = landing_zone.decode_batch(readings_ndjson() if ndjson is None else ndjson, "ndjson")
    LandingWriter(LandingLayout(data_dir)).write_frame("readings", frame)
    settings = config.load_settings(data_dir=data_dir)
    report = delta_processing.Processor(settings, config.load_contracts()).run_once()
    assert not report.failures, report.failures
    assert report.gold, "the processor refreshed no gold table"


def fill_lakehouse(data_dir: Path, contracts_dir: Path) -> None:
    """Good readings plus rejects of two sources, and one dead letter, all processed."""
    contracts_dir.mkdir(parents=True, exist_ok=True)
    (contracts_dir / "meters.toml").write_text(METERS_CONTRACT)
    # The built-in readings contract, with silver partitioned by event date (the cookbook's
    # EXPLAIN recipe then shows partition pruning: 2 days of readings, 2 files).
    readings = (REPO / "config" / "sources" / "readings.toml").read_text()
    assert "[partitioning]" not in readings
    (contracts_dir / "readings.toml").write_text(
        readings + '\n[partitioning]\nsilver = "event_date"\n'
    )
    writer = LandingWriter(LandingLayout(data_dir))
    writer.write_frame("readings", landing_zone.decode_batch(readings_ndjson(), "ndjson"))
    land_records(data_dir, "readings", BAD_READINGS)
    land_records(data_dir, "meters", METER_ROWS)
    writer.write_dead_letters(DEAD_LETTERS)
    settings = config.load_settings(data_dir=data_dir, contracts_dir=contracts_dir)
    processor = delta_processing.Processor(settings, config.load_contracts(contracts_dir))
    report = processor.run_once()
    assert not report.failures, report.failures
    assert report.gold, "the processor refreshed no gold table"


@pytest.fixture(scope="module")
def filled_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lakehouse, filled once, that every notebook of this module reads (never writes)."""
    root = tmp_path_factory.mktemp("notebook-lakehouse")
    data_dir = root / "dados"
    data_dir.mkdir()
    fill_lakehouse(data_dir, root / "contracts")
    return data_dir


def run_notebook(
    kernel_name: str, data_dir: Path, notebook: Path = NOTEBOOK, **env: str
) -> nbformat.NotebookNode:
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=180,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(notebook.parent)}},
    )
    client.execute(env=lakehouse_env(data_dir, **env))
    return nb


def cell_text(cell: nbformat.NotebookNode) -> str:
    chunks = []
    for output in cell.get("outputs", []):
        assert output["output_type"] != "error", f"cell errored: {output}"
        if output["output_type"] == "stream":
            chunks.append(output["text"])
        elif "data" in output:
            chunks.append(output["data"].get("text/plain", ""))
    return "".join(chunks)


def printed_text(nb: nbformat.NotebookNode) -> str:
    return "".join(cell_text(cell) for cell in nb.cells)


def tagged_text(nb: nbformat.NotebookNode, tag: str) -> str:
    """The output of the one code cell tagged ``tag`` (cell metadata ``tags``)."""
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cell_text(cells[0])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_plot(path: Path) -> None:
    assert path.is_file(), f"no plot saved at {path}"
    assert path.stat().st_size > 10_000
    width, height = png_size(path)
    assert width >= 400 and height >= 200


def test_notebooks_are_discovered() -> None:
    names = {path.name for path in NOTEBOOKS}
    assert {NOTEBOOK.name, QUALITY_NOTEBOOK.name, COOKBOOK_NOTEBOOK.name} <= names


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_has_no_outputs(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None


# What the filled lakehouse must make each notebook show; any other notebook must at
# least run cleanly and print something.
def check_gold_overview(nb: nbformat.NotebookNode, plot: Path) -> None:
    text = printed_text(nb)
    assert EMPTY_MARKER not in text
    assert f"{len(DEVICES) * len(SENSORS)} series" in text
    assert f"36 hours, {READINGS_PER_SERIES} readings" in text
    assert_plot(plot)


def check_data_quality(nb: nbformat.NotebookNode, plot: Path) -> None:
    counts = tagged_text(nb, "quarantine-counts")
    for source, rows in QUARANTINED.items():
        assert f"quarantine.{source}: {rows} rows" in counts
    assert f"{sum(QUARANTINED.values())} quarantined rows in total" in counts

    rates = tagged_text(nb, "quality-rates")
    assert "readings" in rates and "meters" in rates
    # meters: 11 in, 7 passed (one of them warned), 1 dropped, 3 quarantined.
    assert "meters: 11 rows in, 7 passed (63.6%), 1 warned, 1 dropped, 3 quarantined" in rates
    good = len(DEVICES) * len(SENSORS) * READINGS_PER_SERIES
    rejected = len(BAD_READINGS)
    passed = f"{good / (good + rejected):.1%}"
    assert (
        f"readings: {good + rejected} rows in, {good} passed ({passed}), 0 warned, 0 dropped, "
        f"{rejected} quarantined"
    ) in rates

    reasons = tagged_text(nb, "quarantine-reasons")
    for reason in (
        "ts: cannot parse",
        "device_id: required field is missing",
        "sensor: required field is missing",
        "value: cannot parse",
        "expectation kwh_plausible failed",
        "kwh: cannot parse",
    ):
        assert reason in reasons

    expectations = tagged_text(nb, "expectation-failures")
    # readings' _contract (5 rows); meters' kwh_plausible (2), _contract, known_site and
    # meter_id_format (1 each).
    assert f"5 check(s) failed at least once ({len(BAD_READINGS) + 5} failures in all)" in (
        expectations
    )
    for name in ("kwh_plausible", "known_site", "meter_id_format", "_contract"):
        assert name in expectations

    dead = tagged_text(nb, "dead-letters")
    assert "1 dead letter(s)" in dead
    assert "nb-dead-letter" in dead
    assert_plot(plot)


def check_cookbook(nb: nbformat.NotebookNode, plot: Path) -> None:
    series = len(DEVICES) * len(SENSORS)
    latest = tagged_text(nb, "latest-value")
    assert f"{series} series; devices: {', '.join(DEVICES)}" in latest
    assert LAST_READING_AT in latest
    assert "silver + QUALIFY gives the same rows as gold.readings_latest: True" in latest

    comparison = tagged_text(nb, "hourly-vs-daily")
    days = f"2 days x {series} series: {2 * series} daily windows"
    assert f"{days}, 0 disagree with their hours" in comparison

    params = tagged_text(nb, "parameterised")
    assert f"device_id = {DEVICES[0]!r}: {len(SENSORS)} sensor(s)" in params
    for sensor in SENSORS:
        assert f"{sensor}: {READINGS_PER_SERIES} readings" in params

    explain = tagged_text(nb, "explain")
    assert "silver.readings is partitioned by _event_date; filtering on 2024-05-02" in explain
    assert "partition pruning: DuckDB scans 1 of 2 files of silver.readings" in explain

    text = printed_text(nb)
    assert f"polars DataFrame: {2 * series} rows" in text
    assert f"wrote {2 * series} rows to readings_daily.parquet" in text


CHECKS: dict[str, Callable[[nbformat.NotebookNode, Path], None]] = {
    NOTEBOOK.name: check_gold_overview,
    QUALITY_NOTEBOOK.name: check_data_quality,
    COOKBOOK_NOTEBOOK.name: check_cookbook,
}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_on_filled_lakehouse(
    notebook: Path, filled_data_dir: Path, tmp_path: Path, kernel_name: str
) -> None:
    plot = tmp_path / "plots" / f"{notebook.stem}.png"

    nb = run_notebook(kernel_name, filled_data_dir, notebook, LAKEHOUSE_NOTEBOOK_PLOT=str(plot))

    assert printed_text(nb).strip(), f"{notebook.name} printed nothing"
    check = CHECKS.get(notebook.name)
    if check is not None:
        check(nb, plot)


def test_notebook_on_small_lakehouse(data_dir: Path, tmp_path: Path, kernel_name: str) -> None:
    build_lakehouse(data_dir)
    plot = tmp_path / "plots" / "hourly.png"

    nb = run_notebook(
        kernel_name,
        data_dir,
        LAKEHOUSE_NOTEBOOK_PLOT=str(plot),
        LAKEHOUSE_NOTEBOOK_DEVICE=DEVICES[1],
        LAKEHOUSE_NOTEBOOK_SENSOR=SENSORS[0],
    )

    text = printed_text(nb)
    assert EMPTY_MARKER not in text
    for table in ("readings_hourly", "readings_daily", "readings_latest"):
        assert table in text
    assert f"{len(DEVICES) * len(SENSORS)} series" in text
    for device in DEVICES:
        assert device in text
    assert f"Plotting device {DEVICES[1]!r}, sensor {SENSORS[0]!r}" in text
    assert "36 hours, 216 readings" in text
    assert_plot(plot)


def test_notebook_defaults_to_first_latest_row(
    data_dir: Path, tmp_path: Path, kernel_name: str
) -> None:
    build_lakehouse(data_dir)
    plot = tmp_path / "first.png"

    text = printed_text(run_notebook(kernel_name, data_dir, LAKEHOUSE_NOTEBOOK_PLOT=str(plot)))

    # readings_latest is ordered by (device_id, sensor): humidity sorts before temperature.
    assert f"Plotting device {DEVICES[0]!r}, sensor {SENSORS[1]!r}" in text
    assert plot.is_file() and plot.stat().st_size > 10_000


def only_quarantined_rows(data_dir: Path) -> None:
    """Gold tables exist but are empty: the only record is rejected into quarantine."""
    bad = {"ts": "not a time", "device_id": "nb-bad", "sensor": "s", "value": 1.0}
    build_lakehouse(data_dir, json.dumps(bad).encode())


NO_GOLD_DATA: dict[str, Callable[[Path], None]] = {
    "empty-data-dir": lambda _data_dir: None,  # a fresh install: nothing ingested yet
    "empty-gold-tables": only_quarantined_rows,
}


@pytest.mark.parametrize("state", NO_GOLD_DATA)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_without_gold_data(
    notebook: Path, state: str, data_dir: Path, tmp_path: Path, kernel_name: str
) -> None:
    """Every notebook runs cleanly, and says there is nothing to show, when gold is empty."""
    NO_GOLD_DATA[state](data_dir)
    plot = tmp_path / "plot.png"

    text = printed_text(
        run_notebook(kernel_name, data_dir, notebook, LAKEHOUSE_NOTEBOOK_PLOT=str(plot))
    )

    assert text.strip(), f"{notebook.name} printed nothing"
    rejected = 1 if state == "empty-gold-tables" else 0
    if notebook == NOTEBOOK:
        assert EMPTY_MARKER in text
        assert str(data_dir.resolve()) in text
        assert "Skipped" in text and "Plotting" not in text
        assert not plot.exists()
    elif notebook == QUALITY_NOTEBOOK:
        assert f"{rejected} quarantined rows in total" in text
        assert "No dead letters" in text
        if rejected:  # one batch of metrics: 1 row in, 0 passed, 1 quarantined
            assert (
                "readings: 1 rows in, 0 passed (0.0%), 0 warned, 0 dropped, 1 quarantined" in text
            )
            assert_plot(plot)
        else:
            assert "No quality metrics" in text
            assert not plot.exists()
    elif notebook == COOKBOOK_NOTEBOOK:
        assert ("empty stand-ins" in text) == (not rejected)
        assert "0 series" in text
        assert "0 days x 0 series: 0 daily windows, 0 disagree with their hours" in text
