"""Object-store outages: Azurite SIGKILLed and restarted under HTTP load, then reconciliation.

The Delta tables live on Azurite (``LAKEHOUSE_STORAGE_URI=az://...``); the landing
zone stays on local disk, so the API keeps acknowledging batches while the store
is away, and the processor must carry them through once it is back.

A SIGKILLed Azurite loses the writes it acknowledged in its last seconds (its
metadata is saved every ``AUTOSAVE_S``, see :mod:`tests.azurite`): a store that
forgets acknowledged writes breaks any Delta table, whoever writes it, and a real
object store does not. As with tansu in ``test_broker_restarts.py``, a meaningful
crash is one that loses nothing the platform owned: the processor (the only
writer of the tables) is frozen with SIGSTOP until Azurite has saved, Azurite is
SIGKILLed, the processor is let go at once (wherever it was: possibly mid-commit)
into a store that refuses connections for ``OUTAGE_S`` seconds, then Azurite comes
back on the same port with the same data. HTTP load runs throughout.

``LAKEHOUSE_RELIABILITY_RESTARTS`` restarts (default 1, CI). The unit tests below
pin down what deltalake raises in an outage and that bronze never gives up a
claim because of one (it used to, after three failed commits).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, SchemaMismatchError

import delta_processing.bronze as bronze_module
import delta_processing.processor as processor_module
from api.tokens import TokenStore
from config.contracts import ContractRegistry, load_contracts
from config.settings import Settings, load_settings
from delta_processing.bronze import MAX_CLAIM_ATTEMPTS
from delta_processing.processor import Processor
from delta_processing.tables import TableStore
from delta_processing.tables import append as real_append
from delta_processing.transient import brief, is_storage_unavailable, outage_behind
from landing_zone.layout import LandingLayout
from tests.azurite import ACCOUNT, ACCOUNT_KEY, AUTOSAVE_S, Azurite
from tests.helpers import (
    free_port,
    land_records,
    start_lakehouse,
    stop,
    wait_healthy,
    wait_until,
)
from tests.reliability.chaos import (
    REPORT,
    HttpLoad,
    Ids,
    Victim,
    assert_clean,
    drain,
    env_int,
    logged,
    processor_victim,
    reconcile,
    wait_in_silver,
)

RESTARTS = env_int("LAKEHOUSE_RELIABILITY_STORAGE_RESTARTS", 1)
OUTAGE_S = env_int("LAKEHOUSE_RELIABILITY_OUTAGE_S", 8)
CONTAINER = "lakehouse"
EMULATOR = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY, "use_emulator": "true"}


@pytest.fixture
def azurite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Azurite]:
    """An Azurite of this test alone (tests here kill it), with its container."""
    emulator = Azurite(tmp_path / "azurite" / "data")
    emulator.start()
    # object_store's emulator mode reads it when a table opens (this process's reads).
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", emulator.blob_url)
    try:
        emulator.create_container(CONTAINER)
        yield emulator
    finally:
        emulator.stop()


def _error_of(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as exc:  # deltalake panics included: what we classify
        return exc
    raise AssertionError("the storage call succeeded")


def _open_error(monkeypatch: pytest.MonkeyPatch, port: int, **options: str) -> BaseException:
    """What opening a table on an emulator endpoint at ``port`` raises."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{port}")
    uri = f"az://{CONTAINER}/t"
    return _error_of(lambda: DeltaTable(uri, storage_options={**EMULATOR, **options}))


class _Answering(BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and an empty body."""

    def _answer(self) -> None:
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the statuses are the point, not the access log."""


@pytest.fixture
def answering() -> Iterator[Callable[[int], int]]:
    """Start HTTP servers answering one status to everything; yields ``status -> port``."""
    servers: list[ThreadingHTTPServer] = []

    def serve(status: int) -> int:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
        server.status = status  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_what_deltalake_raises_in_an_outage_is_storage_unavailable(
    monkeypatch: pytest.MonkeyPatch, answering: Callable[[int], int]
) -> None:
    # Few retries: each case takes object_store's retry loop (the default is 10 retries).
    refused = _open_error(monkeypatch, free_port(), max_retries="1")
    assert type(refused) is OSError and "Connection refused" in str(refused)
    assert is_storage_unavailable(refused)
    for status in (500, 503, 429, 403):
        error = _open_error(monkeypatch, answering(status), max_retries="1")
        assert is_storage_unavailable(error), (status, error)
    # A server that accepts the connection and never answers: a timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hung = _open_error(monkeypatch, silent.getsockname()[1], max_retries="0", timeout="1s")
    assert "timed out" in str(hung) and is_storage_unavailable(hung)
    # Raised from an outage (a wrapper of ours, say): still an outage.
    try:
        raise RuntimeError("promotion failed") from refused
    except RuntimeError as wrapped:
        assert is_storage_unavailable(wrapped)
    assert "\n" not in brief(refused) and "\x1b" not in brief(refused)
    assert "Connection refused" in brief(refused)
    # Answers about the request, not the store's availability.
    for status in (400, 404):
        error = _open_error(monkeypatch, answering(status), max_retries="1")
        assert not is_storage_unavailable(error), (status, error)


def test_a_change_feed_stream_cut_off_by_the_store_is_storage_unavailable() -> None:
    """What reading a ``load_cdf`` stream raises (a plain Exception) when a GET fails."""
    cut = Exception(
        "C Data interface error: External error: Parquet error: Failed to fetch metadata "
        "for file part-0.parquet: Generic MicrosoftAzure error: Error performing GET "
        "http://127.0.0.1:1/devstoreaccount1/lake/part-0.parquet in 2.1s, after 10 "
        "retries - HTTP error: error sending request"
    )
    assert is_storage_unavailable(cut)
    missing = Exception(
        "C Data interface error: External error: Object at location /t/part-0.parquet not found"
    )
    assert not is_storage_unavailable(missing)


def test_errors_about_the_data_are_not_storage_unavailable(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"value": [1]}))
    # Errors about the data quote what a sender chose, which can be made to look like
    # a storage error: only deltalake's plain OSError and DeltaError are read.
    lookalike = "Error performing GET http://x in 1s - HTTP error: error sending request"
    cast = _error_of(lambda: write_deltalake(uri, pa.table({"value": [lookalike]}), mode="append"))
    assert lookalike in str(cast), cast
    assert not is_storage_unavailable(cast)
    mismatch = _error_of(
        lambda: write_deltalake(uri, pa.table({"value": [1], lookalike: [1]}), mode="append")
    )
    assert isinstance(mismatch, SchemaMismatchError)
    assert not is_storage_unavailable(mismatch)
    concat = _error_of(
        lambda: pl.concat([pl.DataFrame({"a": [1]}), pl.DataFrame({"a": [[1]]})], how="vertical")
    )
    assert not is_storage_unavailable(concat)
    assert not is_storage_unavailable(OSError("simulated storage fault"))
    assert not is_storage_unavailable(DeltaError("Invalid data: column value is not nullable"))
    # Python's own outage errors, and a full local disk, are outages.
    assert is_storage_unavailable(ConnectionResetError(104, "Connection reset by peer"))
    assert is_storage_unavailable(TimeoutError("read timed out"))
    assert is_storage_unavailable(OSError(28, "No space left on device"))


def test_an_unknown_error_is_an_outage_only_if_the_store_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    odd = RuntimeError("Already shut down")  # a deltalake panic seen with Azurite killed
    outage = _open_error(monkeypatch, free_port(), max_retries="0")

    def probe_down() -> None:
        raise outage

    def probe_fails_otherwise() -> None:
        raise ValueError("the table's schema is broken")

    assert outage_behind(odd, probe_down)
    assert not outage_behind(odd, lambda: None)  # the store answers: the error stands
    assert not outage_behind(odd, probe_fails_otherwise)


def test_a_write_cut_off_by_a_dead_store_is_storage_unavailable(azurite: Azurite) -> None:
    uri = f"az://{CONTAINER}/cut"
    options = {**azurite.storage_options, "max_retries": "1"}
    write_deltalake(uri, pa.table({"a": [1]}), storage_options=options)
    table = DeltaTable(uri, storage_options=options)
    azurite.kill()
    # The table's log is loaded: the write goes straight to uploading its Parquet file.
    cut = _error_of(lambda: write_deltalake(table, pa.table({"a": [2]}), mode="append"))
    assert type(cut) is DeltaError, cut
    assert is_storage_unavailable(cut), cut


def _lake_settings(azurite: Azurite, data_dir: Path) -> Settings:
    return load_settings(
        data_dir=data_dir,
        storage_uri=f"az://{CONTAINER}/lake",
        # object_store's default retries (~2 s per refused request): polars, which
        # silver reads with, rejects a `max_retries` option.
        storage_options=azurite.storage_options,
        trigger_latency_ms=0,
        file_settle_ms=0,
    )


def _reading(second: int) -> dict[str, object]:
    return {"ts": f"2026-11-20T00:00:{second:02d}Z", "device_id": "d1", "sensor": "t",
            "value": float(second)}  # fmt: skip


def _outages(processor: Processor) -> float:
    """Cycles that met a storage outage (the processor's counter)."""
    return sum(
        sample.value
        for metric in processor.metrics.storage_unavailable.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_bronze_retries_a_storage_outage_without_giving_up_the_claim(
    azurite: Azurite, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append of a claim fails in an outage more often than a claim may fail.

    Only the append meets the outage (the emulator endpoint is pointed at a closed
    port around it): opening the table works, so the claim is committed again on
    every cycle and each failure reaches bronze's give-up count, as when the store
    goes away between reading a table and committing to it. It used to set the
    acknowledged file aside into the file quarantine on the third cycle.
    """
    settings = _lake_settings(azurite, data_dir)
    processor = Processor(settings, load_contracts())
    land_records(data_dir, "readings", [_reading(1)])
    assert processor.run_once().failures == []

    outage = threading.Event()
    outage.set()

    def append_in_outage(target: object, *args: object, **kwargs: object) -> None:
        if outage.is_set():
            monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{free_port()}")
            if isinstance(target, DeltaTable):
                # Bronze appends through the table it opened, whose client reached the
                # store before the outage began; reached afresh, it meets the outage.
                target = target.table_uri
        try:
            real_append(target, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.blob_url)

    monkeypatch.setattr(bronze_module, "append", append_in_outage)
    acknowledged = land_records(data_dir, "readings", [_reading(2)])
    layout = LandingLayout(data_dir)
    for _cycle in range(MAX_CLAIM_ATTEMPTS + 1):
        report = processor.run_cycle()
        assert report.storage_unavailable, report.failures
        assert len(report.failures) == 1 and "Connection refused" in report.failures[0]
        assert [seq for seq, _ in layout.inflight_batches("readings")] == [2]
    assert not layout.quarantine_files_dir("readings").exists()
    assert _outages(processor) == MAX_CLAIM_ATTEMPTS + 1

    outage.clear()  # the store is back: the claim goes through, once
    report = processor.run_cycle()
    assert report.failures == [] and not report.storage_unavailable
    assert [b.files for b in report.bronze] == [1]
    assert layout.inflight_batches("readings") == []
    store = TableStore.from_settings(settings)
    silver = store.open("silver", "readings")
    assert silver is not None
    assert sorted(pl.read_delta(silver)["value"].to_list()) == [1.0, 2.0]
    archived = [p.name for p in (data_dir / "archive").rglob("*") if p.is_file()]
    assert acknowledged in archived

    # Errors of the data itself still set a claim aside after MAX_CLAIM_ATTEMPTS.
    def poisoned_append(*_args: object, **_kwargs: object) -> None:
        raise SchemaMismatchError("Cannot cast field value from Utf8 to Float64")

    monkeypatch.setattr(bronze_module, "append", poisoned_append)
    poison = land_records(data_dir, "readings", [_reading(3)])
    for _cycle in range(MAX_CLAIM_ATTEMPTS - 1):
        report = processor.run_cycle()
        assert len(report.failures) == 1 and not report.storage_unavailable
    assert processor.run_cycle().failures == []
    assert (layout.quarantine_files_dir("readings") / poison).is_file()


def test_the_store_probe_tells_an_answering_store_from_an_absent_one(
    azurite: Azurite, tmp_path: Path
) -> None:
    store = TableStore(f"az://{CONTAINER}/lake", {**EMULATOR, "retry_timeout": "1s"})
    assert store.answers()
    azurite.stop()
    assert not store.answers()
    azurite.start()
    assert store.answers()
    # Local tables: an outage is a full disk, and the store answers once there is room.
    local = TableStore(tmp_path)
    assert local.answers(min_free_bytes=0)
    assert not local.answers(min_free_bytes=2**62)


def test_the_processor_resumes_as_soon_as_the_store_answers(
    azurite: Azurite, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage the processor used to sleep its whole back-off (doubling to
    30 s) however soon the store came back. Here one failed cycle backs off for two
    minutes: the processor must notice the store's return by probing it, long before.
    """
    for bound in ("BACKOFF_MIN_S", "BACKOFF_MAX_S"):
        monkeypatch.setattr(processor_module, bound, 120.0)
    settings = _lake_settings(azurite, data_dir)
    processor = Processor(settings, load_contracts())
    land_records(data_dir, "readings", [_reading(1)])
    assert processor.run_once().failures == []
    azurite.stop()  # saves what it acknowledged (a SIGKILL loses its last seconds)
    land_records(data_dir, "readings", [_reading(2)])
    stop_event = threading.Event()
    thread = threading.Thread(target=processor.run_forever, args=(stop_event,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: _outages(processor) >= 1, timeout=60)
        azurite.start()
        back_at = time.monotonic()
        silver = TableStore(f"az://{CONTAINER}/lake", azurite.storage_options)

        def both_in_silver() -> bool:
            table = silver.open("silver", "readings")
            return table is not None and table.to_pyarrow_dataset().count_rows() == 2

        wait_until(both_in_silver, timeout=100, every=0.5)
        resumed_after = time.monotonic() - back_at
    finally:
        stop_event.set()
        processor.wake.set()
        thread.join(60)
    assert not thread.is_alive()
    assert resumed_after < 30, f"resumed {resumed_after:.1f} s after the store came back"


def test_the_processor_survives_housekeeping_on_a_dead_store(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Housekeeping listing tables on an unreachable store used to end ``run_forever``."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{free_port()}")
    settings = load_settings(
        data_dir=data_dir,
        storage_uri=f"az://{CONTAINER}/lake",
        storage_options={**EMULATOR, "max_retries": "0"},
        maintenance_interval_s=0.05,
        rescan_interval_s=0.05,
    )
    processor = Processor(settings, ContractRegistry({}))  # no source: only housekeeping
    attempts: list[BaseException] = []
    real_housekeeping = processor.housekeeping

    def counted_housekeeping() -> None:
        try:
            real_housekeeping()
        except BaseException as exc:
            attempts.append(exc)
            raise

    monkeypatch.setattr(processor, "housekeeping", counted_housekeeping)
    stop_event = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            processor.run_forever(stop_event)
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(attempts) < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_event.set()
    processor.wake.set()
    thread.join(30)
    assert crashed == []
    assert len(attempts) >= 2 and all(is_storage_unavailable(e) for e in attempts), attempts


@dataclass
class Lake:
    """The platform with its tables on Azurite: API and processor as real processes."""

    data_dir: Path
    azurite: Azurite
    base_url: str
    token: str
    processor: Victim
    processor_log: Path
    env: dict[str, str]

    @property
    def tables(self) -> TableStore:
        return TableStore(f"az://{CONTAINER}/lake", self.azurite.storage_options)


@pytest.fixture
def lake(data_dir: Path, tmp_path: Path, azurite: Azurite) -> Iterator[Lake]:
    env = {
        "LAKEHOUSE_STORAGE_URI": f"az://{CONTAINER}/lake",
        # Bounded client waits, as production should set them (object_store's defaults
        # let one request of a half-started store retry for minutes). The retry budget
        # is kept well under OUTAGE_S: object_store's jittered back-off over its 10
        # retries can add up to more than the outage, which then passes unnoticed
        # inside one request and the processor's own outage handling goes untested.
        "LAKEHOUSE_STORAGE_OPTIONS": json.dumps(
            {**azurite.storage_options, "timeout": "10s", "retry_timeout": "2s"}
        ),
        **azurite.emulator_env(),
    }
    token = TokenStore(load_settings(data_dir=data_dir).tokens_file).create(
        "chaos", ["ingest:readings"]
    )
    port = free_port()
    api_log = tmp_path / "api.log"
    api = start_lakehouse(["api", "--port", str(port)], data_dir, api_log, **env)
    processor_log = tmp_path / "processor.log"
    lake = Lake(
        data_dir=data_dir,
        azurite=azurite,
        base_url=f"http://127.0.0.1:{port}",
        token=token,
        processor=processor_victim(data_dir, processor_log, **env),
        processor_log=processor_log,
        env=env,
    )
    try:
        wait_healthy(lake.base_url, api, api_log)
        lake.processor.start()
        yield lake
    finally:
        proc = lake.processor.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # never leave it frozen
        lake.processor.stop()
        stop(api)


def _crash_the_store(lake: Lake) -> None:
    """Freeze the writer until Azurite has saved, SIGKILL Azurite, let the writer go."""
    proc = lake.processor.proc
    assert proc is not None and proc.poll() is None, "the processor died"
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(AUTOSAVE_S + 1.5)
        lake.azurite.kill()
    finally:
        proc.send_signal(signal.SIGCONT)


@pytest.mark.reliability
@pytest.mark.timeout(240 + 150 * RESTARTS)
def test_storage_restarts_under_load_lose_and_duplicate_nothing(lake: Lake) -> None:
    http = HttpLoad(Ids(), lake.base_url, lake.token)
    http.start()
    downtime: list[float] = []
    try:
        for _restart in range(RESTARTS):
            # Some data all the way through first: the outage meets live tables.
            time.sleep(2)
            assert not wait_in_silver(lake.data_dir, set(http.acked), 120, lake.tables)
            _crash_the_store(lake)
            down_at = time.monotonic()
            time.sleep(OUTAGE_S)  # the processor meets a store refusing connections
            lake.azurite.start()  # same port, same data location
            downtime.append(time.monotonic() - down_at)
        time.sleep(2)
    finally:
        http.finish()
    missing = wait_in_silver(lake.data_dir, set(http.acked), 90, lake.tables)
    proc = lake.processor.proc
    assert proc is not None and proc.poll() is None, "the processor died in the outage"
    assert not missing, f"{len(missing)} acknowledged records not in silver after the outage"
    lake.processor.stop()
    # The processor met the outage (it logs each storage_unavailable cycle at WARNING).
    outages = logged(lake.processor_log, "processor.storage_unavailable")
    assert outages >= RESTARTS, lake.processor_log.read_text()[-4000:]
    drain(lake.data_dir, **lake.env)

    summary = reconcile(lake.data_dir, [http], kills=0, tables=lake.tables)
    set_aside = LandingLayout(lake.data_dir).quarantine_files_dir("readings")
    files_set_aside = sorted(p.name for p in set_aside.iterdir()) if set_aside.exists() else []
    REPORT.append(f"storage restarts: azurite={RESTARTS} (SIGKILL, {OUTAGE_S}s down) "
                  f"records={summary.records} losses={summary.losses} "
                  f"duplicates={summary.duplicates} failed_cycles={outages} "
                  f"files_set_aside={len(files_set_aside)}")  # fmt: skip
    print(f"  azurite down {[round(d, 1) for d in downtime]} s, "
          f"HTTP statuses {dict(http.statuses)}")  # fmt: skip
    assert files_set_aside == [], f"acknowledged landing files set aside: {files_set_aside}"
    assert len(http.acked) > 0, summary.details
    assert_clean(summary)
