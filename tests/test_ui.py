"""The status page in a real headless Chromium against a real `lakehouse api` process.

The lakehouse is filled by the processor first, so the page must show exactly
those tables and row counts; the HTML shell carries no data and the data
endpoint needs a token.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from tests.conftest import LiveServer, Tokens
from tests.helpers import land_records

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs the Debian chromium package (make system-deps)"
)

BATCHES = 4
ROWS_PER_BATCH = 5


def fill(settings: Settings) -> None:
    """Four batches of five good readings and one batch with an unparseable time."""
    processor = Processor(settings, load_contracts())
    for batch in range(BATCHES):
        rows = [
            {
                "ts": f"2026-11-20T1{batch}:00:{i:02d}Z",
                "device_id": f"d{i % 2}",
                "sensor": "temp",
                "value": i,
            }
            for i in range(ROWS_PER_BATCH)
        ]
        land_records(settings.data_dir, "readings", rows)
        processor.run_once()
    land_records(settings.data_dir, "readings", [{"ts": "never", "device_id": "x",
                                                   "sensor": "t", "value": 1}])  # fmt: skip
    processor.run_once()


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def filled_api(settings: Settings, live_api: LiveServer) -> LiveServer:
    fill(settings)
    return live_api


def open_page(browser: object, url: str) -> object:
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    page.errors = errors
    return page


def test_page_shows_tables_pipeline_and_ingestion_chart(
    filled_api: LiveServer, tokens: Tokens, browser: object, tmp_path: Path
) -> None:
    page = open_page(browser, f"{filled_api.base_url}/ui#token={tokens.query}")
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    page.screenshot(path=str(tmp_path / "status.png"), full_page=True)

    # The token left the address bar and lives in the tab's sessionStorage.
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('lakehouse.token')") == tokens.query
    assert page.is_hidden("#login") and page.is_visible("#status")

    def rows_of(table: str) -> str:
        return page.inner_text(f"#tables tbody tr[data-table='{table}'] td.rows")

    good = BATCHES * ROWS_PER_BATCH
    assert rows_of("bronze/readings") == str(good + 1)
    assert rows_of("silver/readings") == str(good)
    assert rows_of("quarantine/readings") == "1"
    assert rows_of("gold/readings_latest") == "2"  # two devices, one sensor
    assert rows_of("gold/readings_hourly") == str(BATCHES * 2)
    listed = page.eval_on_selector_all("#tables tbody tr", "rows => rows.map(r => r.dataset.table)")
    assert set(listed) == {
        "bronze/readings", "silver/readings", "quarantine/readings", "_meta/quality",
        "gold/readings_hourly", "gold/readings_daily", "gold/readings_latest",
    }  # fmt: skip

    # The pipeline picture: source -> bronze -> silver -> three gold tables, with edges.
    nodes = page.eval_on_selector_all(
        "#pipeline svg g.node", "gs => gs.map(g => g.getAttribute('data-table'))"
    )
    assert nodes == [
        None, "bronze/readings", "silver/readings",
        "gold/readings_hourly", "gold/readings_daily", "gold/readings_latest",
    ]  # fmt: skip
    assert page.locator("#pipeline svg path.edge").count() == 5
    assert f"{good + 1} rows" in (page.text_content("#pipeline g.node.bronze") or "")

    # The ingestion chart: bars hold every bronze row committed in the last hour.
    bars = page.eval_on_selector_all(
        "#ingestion-chart rect.bar", "rs => rs.map(r => Number(r.getAttribute('data-rows')))"
    )
    assert bars and all(b > 0 for b in bars)
    assert sum(bars) == good + 1
    assert page.get_attribute("#ingestion-line", "d").startswith("M")
    assert f"{good + 1} rows" in page.inner_text("#ingestion-total")

    # Problems: the bad batch's quality failure; no dead letters.
    assert page.locator("#quality tbody tr").count() == 1
    assert "_contract (quarantine): 1" in page.inner_text("#quality tbody")
    assert page.is_visible("#dead-letters-empty")
    assert page.errors == []


def test_page_without_token_asks_for_one_and_shows_no_data(
    filled_api: LiveServer, tokens: Tokens, browser: object
) -> None:
    shell = httpx.get(f"{filled_api.base_url}/ui")
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert "readings" not in shell.text
    assert "script-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(f"{filled_api.base_url}/v1/status").status_code == 401
    assert httpx.get(f"{filled_api.base_url}/ui/static/../app.py").status_code == 404
    assert httpx.get(f"{filled_api.base_url}/ui/static/app.js").status_code == 200

    page = open_page(browser, f"{filled_api.base_url}/ui")
    page.wait_for_selector("body[data-state=login]", timeout=30_000)
    assert page.is_visible("#token-form") and page.is_hidden("#status")
    assert page.locator("#tables tbody tr").count() == 0
    assert "readings" not in page.inner_text("body")

    # A wrong token in the fragment: the prompt again, with the API's reason.
    page = open_page(browser, f"{filled_api.base_url}/ui#token=lh_wrong")
    page.wait_for_selector("body[data-state=login]", timeout=30_000)
    page.locator("#login-error", has_text="token").wait_for()
    assert "invalid or revoked token" in page.inner_text("#login-error")
    assert page.evaluate("sessionStorage.getItem('lakehouse.token')") is None

    # A token without the query scope is refused too.
    page.fill("#token-input", tokens.ingest_readings)
    page.click("#token-form button[type=submit]")
    page.locator("#login-error", has_text="scope").wait_for()
    assert page.locator("#tables tbody tr").count() == 0

    # The form: a good token shows the data; "Forget token" hides it again.
    page.fill("#token-input", tokens.query)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert page.locator("#tables tbody tr").count() == 7
    page.click("#forget")
    page.wait_for_selector("body[data-state=login]")
    assert page.locator("#tables tbody tr").count() == 0
    assert page.evaluate("sessionStorage.getItem('lakehouse.token')") is None
    assert page.errors == [] or all("401" in e or "403" in e for e in page.errors)
