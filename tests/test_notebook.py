"""notebooks/01_gold_overview.ipynb runs end to end against a real (small) lakehouse.

The notebook is executed with nbclient in a kernel started from *this* interpreter
(the venv's python): a kernelspec pointing at ``sys.executable`` is written into a
temporary directory under a unique name and put first on ``JUPYTER_PATH``, so no
kernelspec installed on the machine (user, system or another venv) can be picked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

import config
import delta_processing
import landing_zone
from landing_zone import LandingLayout, LandingWriter
from tests.helpers import REPO, lakehouse_env

NOTEBOOK = REPO / "notebooks" / "01_gold_overview.ipynb"
KERNEL_NAME = "lakehouse-test-python"
DEVICES = ["nb-device-alpha", "nb-device-beta"]
SENSORS = ["temperature", "humidity"]
EMPTY_MARKER = "has no gold readings yet"


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
    start = datetime(2024, 5, 1, tzinfo=UTC)
    lines = []
    for d, device in enumerate(DEVICES):
        for s, sensor in enumerate(SENSORS):
            for i in range(36 * 6):  # 36 hours, one reading every 10 minutes
                value = 20.0 + 5 * d + 10 * s + (i % 12) * 0.5 + (i // 6) * 0.1
                record = {
                    "ts": (start + timedelta(minutes=10 * i)).isoformat(),
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


def run_notebook(kernel_name: str, data_dir: Path, **env: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=180,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env=lakehouse_env(data_dir, **env))
    return nb


def printed_text(nb: nbformat.NotebookNode) -> str:
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"cell errored: {output}"
            if output["output_type"] == "stream":
                chunks.append(output["text"])
            elif "data" in output:
                chunks.append(output["data"].get("text/plain", ""))
    return "".join(chunks)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_saved_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None


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
    assert plot.is_file()
    assert plot.stat().st_size > 10_000
    width, height = png_size(plot)
    assert width >= 400 and height >= 200


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


@pytest.mark.parametrize(
    "prepare",
    [lambda _data_dir: None, only_quarantined_rows],
    ids=["empty-data-dir", "empty-gold-tables"],
)
def test_notebook_on_empty_lakehouse(
    data_dir: Path, tmp_path: Path, kernel_name: str, prepare: Callable[[Path], None]
) -> None:
    prepare(data_dir)
    plot = tmp_path / "never.png"

    text = printed_text(run_notebook(kernel_name, data_dir, LAKEHOUSE_NOTEBOOK_PLOT=str(plot)))

    assert EMPTY_MARKER in text
    assert str(data_dir.resolve()) in text
    assert "Skipped" in text and "Plotting" not in text
    assert not plot.exists()
