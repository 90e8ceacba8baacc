"""Archive upload to Azure Blob Storage (Azurite): verified, idempotent, retried, pruned."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import astuple
from datetime import timedelta
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from landing_zone.archive_upload import ArchiveUploader
from landing_zone.layout import LandingLayout
from landing_zone.mqtt_batch import Received
from landing_zone.mqtt_journal import LandingRef, ReceiveWindow, RedeliveryJournal, journal_path
from tests.azurite import Azurite
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, land_records

DAY = 86400


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    emulator = Azurite(tmp_path_factory.mktemp("azurite-archive") / "data")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def container() -> str:
    return f"archive-{uuid.uuid4().hex[:12]}"


def _uploader(azurite: Azurite, data_dir: Path, container: str, **extra: object) -> ArchiveUploader:
    settings = load_settings(
        data_dir=data_dir,
        archive_uri=f"az://{container}/landing",
        archive_connection_string=azurite.connection_string,
        **extra,
    )
    uploader = ArchiveUploader.from_settings(settings)
    assert uploader is not None
    uploader.backoff_s = 0.1
    uploader.max_backoff_s = 1.0
    return uploader


def _archive(data_dir: Path, files: dict[str, bytes], age_days: float = 0) -> None:
    for relative, content in files.items():
        path = data_dir / "archive" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        if age_days:
            then = time.time() - age_days * DAY
            os.utime(path, (then, then))


def _blobs(azurite: Azurite, container: str) -> dict[str, bytes]:
    client = ContainerClient.from_connection_string(azurite.connection_string, container)
    return {blob.name: client.download_blob(blob.name).readall() for blob in client.list_blobs()}


FILES = {
    f"readings/2026-11-0{day}/batch-{n}.ndjson": os.urandom(1000 * n + day)
    for day in (1, 2)
    for n in range(1, 6)
}


def test_upload_is_verified_idempotent_and_prune_removes_only_uploaded_old_files(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    _archive(data_dir, FILES, age_days=3)
    uploader = _uploader(azurite, data_dir, container, archive_upload_concurrency=4)

    report = uploader.upload_pending()

    assert sorted(report.uploaded) == sorted(FILES) and not report.failed
    assert _blobs(azurite, container) == {f"landing/{k}": v for k, v in FILES.items()}
    assert uploader.upload_pending().uploaded == []  # nothing pending any more

    # A crash after the uploads but before the journal: verified again, not re-sent.
    uploader.journal_path.unlink()
    again = uploader.upload_pending()
    assert again.uploaded == [] and sorted(again.already_present) == sorted(FILES)
    assert len(_blobs(azurite, container)) == len(FILES)

    # Retention: only old files with a verified upload go; new and unuploaded ones stay.
    _archive(data_dir, {"readings/2026-11-03/late.ndjson": b"not uploaded yet"}, age_days=3)
    _archive(data_dir, {"readings/2026-11-04/fresh.ndjson": b"fresh"})
    uploader.upload_pending()  # uploads both...
    _archive(data_dir, {"readings/2026-11-03/after.ndjson": b"landed after the upload"}, 3)
    assert uploader.prune(timedelta(days=1), dry_run=True).removed  # ...dry run removes nothing
    assert len(list((data_dir / "archive").rglob("*.ndjson"))) == len(FILES) + 3

    pruned = uploader.prune(timedelta(days=1))

    assert sorted(pruned.removed) == sorted([*FILES, "readings/2026-11-03/late.ndjson"])
    assert pruned.not_uploaded == 1
    left = sorted(p.relative_to(data_dir / "archive").as_posix()
                  for p in (data_dir / "archive").rglob("*") if p.is_file())  # fmt: skip
    assert left == ["readings/2026-11-03/after.ndjson", "readings/2026-11-04/fresh.ndjson"]
    assert not (data_dir / "archive" / "readings" / "2026-11-01").exists()  # emptied day dir
    assert set(uploader.uploaded()) == {"readings/2026-11-04/fresh.ndjson"}
    assert len(_blobs(azurite, container)) == len(FILES) + 2  # the archive copy stays


def test_a_reused_name_never_overwrites_an_archived_blob(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    uploader = _uploader(azurite, data_dir, container)
    _archive(data_dir, {"drop/2026-11-01/export.json": b"first"}, age_days=2)
    uploader.upload_pending()
    uploader.prune(timedelta(days=1))
    _archive(data_dir, {"drop/2026-11-01/export.json": b"second, longer"})

    assert uploader.upload_pending().uploaded == ["drop/2026-11-01/export.json"]

    assert _blobs(azurite, container) == {
        "landing/drop/2026-11-01/export.json": b"first",
        "landing/drop/2026-11-01/export~u1.json": b"second, longer",
    }


def test_a_blob_removed_remotely_keeps_the_local_file(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    uploader = _uploader(azurite, data_dir, container)
    _archive(data_dir, {"readings/2026-11-01/a.ndjson": b"a"}, age_days=2)
    uploader.upload_pending()
    uploader.container.delete_blob("landing/readings/2026-11-01/a.ndjson")

    pruned = uploader.prune(timedelta(days=1))

    assert pruned.removed == [] and pruned.mismatched == ["readings/2026-11-01/a.ndjson"]
    assert (data_dir / "archive" / "readings" / "2026-11-01" / "a.ndjson").exists()
    assert uploader.upload_pending().uploaded == ["readings/2026-11-01/a.ndjson"]


def test_uploads_retry_through_an_azurite_restart(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    _archive(data_dir, FILES)
    uploader = _uploader(azurite, data_dir, container, archive_upload_retries=12)
    azurite.create_container(container)
    first = dict(list(FILES.items())[:3])
    # Some files were uploaded before the outage (one of them without its journal entry).
    for relative, content in first.items():
        uploader.container.upload_blob(f"landing/{relative}", content)
    azurite.stop()
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.update(r=uploader.upload_pending()))
    worker.start()
    time.sleep(2.0)  # the uploads fail and back off meanwhile
    assert worker.is_alive()
    azurite.start()  # same port, same --location: the blobs written before survive
    worker.join(timeout=120)
    assert not worker.is_alive()

    report = outcome["r"]
    assert not report.failed, report.failed  # type: ignore[attr-defined]
    assert report.attempts > len(FILES)  # type: ignore[attr-defined]
    assert sorted(report.uploaded + report.already_present) == sorted(FILES)  # type: ignore[attr-defined]
    # Nothing lost, nothing duplicated: exactly one blob per file, with its bytes.
    assert _blobs(azurite, container) == {f"landing/{k}": v for k, v in FILES.items()}


def test_a_failed_run_leaves_files_pending_for_the_next(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    _archive(data_dir, FILES)
    uploader = _uploader(azurite, data_dir, container, archive_upload_retries=0)
    azurite.stop()
    try:
        failed = uploader.upload_pending()
    finally:
        azurite.start()
    assert sorted(failed.failed) == sorted(FILES) and failed.uploaded == []
    assert uploader.uploaded() == {}
    assert sorted(uploader.upload_pending().uploaded) == sorted(FILES)
    assert _blobs(azurite, container) == {f"landing/{k}": v for k, v in FILES.items()}


def test_processor_housekeeping_uploads_and_prunes_the_landing_archive(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    settings = load_settings(
        data_dir=data_dir,
        file_settle_ms=0,
        archive_uri=f"az://{container}",
        archive_connection_string=azurite.connection_string,
        archive_retention_days=0,
    )
    processor = Processor(settings, load_contracts())
    name = land_records(data_dir, "readings", [{"ts": "2026-11-20T00:00:00Z", "device_id": "d",
                                                "sensor": "t", "value": 1.0}])  # fmt: skip
    processor.run_once()
    archived = next((data_dir / "archive" / "readings").rglob(name))
    content = archived.read_bytes()

    processor.housekeeping()

    assert _blobs(azurite, container) == {
        archived.relative_to(data_dir / "archive").as_posix(): content
    }
    assert not archived.exists()  # retention 0: removed once the upload was verified


def test_cli_archive_upload_and_prune(azurite: Azurite, data_dir: Path, container: str) -> None:
    _archive(data_dir, {"readings/2026-11-01/a.ndjson": b"a", "readings/2026-11-01/b.ndjson": b"b"},
             age_days=2)  # fmt: skip
    env = lakehouse_env(
        data_dir,
        LAKEHOUSE_ARCHIVE_URI=f"az://{container}/cli",
        LAKEHOUSE_ARCHIVE_CONNECTION_STRING=azurite.connection_string,
    )

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*LAKEHOUSE, "archive", *args], cwd=REPO, env=env,
                              capture_output=True, timeout=120, check=False)  # fmt: skip

    upload = run("upload")
    assert upload.returncode == 0, upload.stderr.decode()
    assert "uploaded 2" in upload.stdout.decode()
    assert b"AccountKey" not in upload.stdout + upload.stderr  # no credential in the output
    prune = run("prune", "--older-than-days", "1")
    assert prune.returncode == 0, prune.stderr.decode()
    assert "removed 2" in prune.stdout.decode()
    assert sorted(_blobs(azurite, container)) == [
        "cli/readings/2026-11-01/a.ndjson", "cli/readings/2026-11-01/b.ndjson"
    ]  # fmt: skip
    missing = subprocess.run(
        [*LAKEHOUSE, "archive", "upload"], cwd=REPO, env=lakehouse_env(data_dir),
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and b"LAKEHOUSE_ARCHIVE_URI" in missing.stderr


def test_prune_keeps_a_file_an_mqtt_redelivery_journal_names(
    azurite: Azurite, data_dir: Path, container: str
) -> None:
    """A restarted MQTT bridge recognises a redelivered copy by its batch's landing file:
    pruning that file used to let the copy land a second time."""
    journaled = LandingRef("readings", "20261101T100000000000Z-000000000001")
    files = {
        f"readings/2026-11-01/{journaled.batch_id}.parquet": b"landed by the bridge",
        "readings/2026-11-01/20261101T100000000000Z-000000000002.parquet": b"other",
    }
    _archive(data_dir, files, age_days=3)
    path = journal_path(data_dir, "127.0.0.1", 1883, "bridge-1")
    journal = RedeliveryJournal.open(path, 10, lambda ref: True)
    landed: Received = (7, 1, b"tele/dev/temp", b"21.5", 0.0)
    journal.record(
        [(journaled, [landed])], connection=0, seen=1, window=ReceiveWindow(0, 0, 1), epoch=0
    )
    uploader = _uploader(azurite, data_dir, container)
    uploader.upload_pending()

    pruned = uploader.prune(timedelta(days=1))

    assert pruned.removed == ["readings/2026-11-01/20261101T100000000000Z-000000000002.parquet"]
    assert pruned.journaled == 1
    layout = LandingLayout(data_dir)
    reopened = RedeliveryJournal.open(path, 10, lambda ref: layout.batch_exists(*astuple(ref)))
    copy = [(7, 1, b"tele/dev/temp", b"21.5", 0.0)]
    assert reopened.known(copy, [0], connection=1, seen=1, window=ReceiveWindow(1, 0, 1)) == [0]
