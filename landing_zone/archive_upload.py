"""Archive upload: processed landing files go to an Azure Blob container, then age out locally.

Bronze moves every landing file it has committed to ``<data_dir>/archive/<source>/<day>/``.
:class:`ArchiveUploader` copies that archive to ``az://<container>/<prefix>/<source>/<day>/``
and :meth:`ArchiveUploader.prune` removes local files past the retention.

Invariants protected here:

* **A local file is removed only after a verified upload.** An upload counts once
  the blob's size and stored MD5 equal the local file's; it is then recorded in
  the journal ``<data_dir>/_meta/archive_uploads.jsonl`` (appended and fsynced).
  Pruning only considers journaled files, and checks the blob once more first.
* **A file an MQTT redelivery journal names stays.** The MQTT bridge tells a
  redelivered copy from a new message by finding the landing file its batch wrote;
  pruning such a file would let a restarted bridge land the copy again.
* **Uploads are idempotent.** A crash between the upload and the journal entry
  leaves a blob equal to the local file: the next run finds it, verifies it and
  records it without uploading again. Blobs are never overwritten: if a blob of
  that name holds other bytes (a pruned ``export.json`` whose name a newer file
  reuses), the file goes to ``<head>~u<n>.<rest>`` instead, so nothing archived
  is ever lost.
* **Transient failures are retried** (connection errors, timeouts, 408/429/5xx)
  with exponential back-off and jitter; other errors fail that file only, and
  the next run tries it again.

Uploads run in a thread pool (``LAKEHOUSE_ARCHIVE_UPLOAD_CONCURRENCY``): each one
is network-bound, so threads overlap their waits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobClient, ContainerClient, ContentSettings

from config.settings import Settings, SettingsError
from landing_zone.layout import fsync_directory
from landing_zone.mqtt_journal import journaled_landing_files

log = structlog.get_logger(__name__)

JOURNAL = Path("_meta") / "archive_uploads.jsonl"
_CHUNK = 1024 * 1024


class ArchiveUploadError(RuntimeError):
    """An upload that cannot succeed as configured (not a transient failure)."""


@dataclass(frozen=True)
class UploadRecord:
    """One verified upload: local file (relative to the archive), blob name, size, MD5."""

    file: str
    blob: str
    size: int
    md5: str  # base64, as Azure reports Content-MD5
    uploaded_at: str


@dataclass
class UploadReport:
    """What one :meth:`ArchiveUploader.upload_pending` run did, by archive-relative path."""

    uploaded: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)  # found verified, not re-sent
    failed: dict[str, str] = field(default_factory=dict)
    attempts: int = 0


@dataclass
class PruneReport:
    """What one :meth:`ArchiveUploader.prune` run did."""

    removed: list[str] = field(default_factory=list)
    not_uploaded: int = 0  # past retention but not (verifiably) uploaded: kept
    journaled: int = 0  # past retention but named by an MQTT redelivery journal: kept
    mismatched: list[str] = field(default_factory=list)  # blob gone or changed: re-upload


def parse_archive_uri(uri: str) -> tuple[str, str]:
    """``az://container/some/prefix`` -> ``("container", "some/prefix")``."""
    scheme, sep, rest = uri.partition("://")
    container, _, prefix = rest.partition("/")
    if not sep or scheme != "az" or not container:
        raise ValueError(f"archive URI must be az://<container>[/<prefix>], not {uri!r}")
    return container, prefix.strip("/")


def file_md5(path: Path) -> str:
    """Base64 MD5 of a file's bytes (the form of Azure's ``Content-MD5``)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: the network or the service, not our request."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True  # connection refused/reset, timeouts
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        return status in (408, 429) or status >= 500
    return isinstance(exc, ConnectionError | TimeoutError)


def _alternative_name(blob: str, counter: int) -> str:
    directory, slash, name = blob.rpartition("/")
    head, dot, rest = name.partition(".")
    return f"{directory}{slash}{head}~u{counter}{dot}{rest}"


class ArchiveUploader:
    """Uploads ``<data_dir>/archive`` to one blob container (under a prefix) and prunes it."""

    def __init__(
        self,
        data_dir: Path,
        container: ContainerClient,
        prefix: str = "",
        *,
        concurrency: int = 4,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.data_dir = data_dir
        self.archive_root = data_dir / "archive"
        self.container = container
        self.prefix = prefix.strip("/")
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._journal_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArchiveUploader | None:
        """The uploader ``LAKEHOUSE_ARCHIVE_*`` configure, or ``None`` if no archive URI is set.

        Raises :class:`~config.settings.SettingsError` if the URI is set without credentials.
        """
        if settings.archive_uri is None:
            return None
        container_name, prefix = parse_archive_uri(settings.archive_uri)
        # No SDK retries (its first back-off is 15 s per attempt): ours, with back-off,
        # decide how long to wait.
        transport: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": 10,
            "read_timeout": 120,
        }
        if settings.archive_connection_string is not None:
            container = ContainerClient.from_connection_string(
                settings.archive_connection_string.get_secret_value(), container_name, **transport
            )
        else:
            account = settings.azure_storage_account_name
            url = settings.archive_account_url or (
                f"https://{account}.blob.core.windows.net" if account else None
            )
            if url is None:
                raise SettingsError(
                    "LAKEHOUSE_ARCHIVE_URI is set but not how to reach it: set "
                    "LAKEHOUSE_ARCHIVE_CONNECTION_STRING, or LAKEHOUSE_AZURE_STORAGE_ACCOUNT_NAME "
                    "and LAKEHOUSE_AZURE_STORAGE_ACCOUNT_KEY (or a SAS URL in "
                    "LAKEHOUSE_ARCHIVE_ACCOUNT_URL)"
                )
            key = settings.azure_storage_account_key
            credential = (
                {"account_name": account, "account_key": key.get_secret_value()}
                if account and key is not None
                else None  # a SAS token in the account URL
            )
            container = ContainerClient(url, container_name, credential=credential, **transport)
        return cls(
            settings.data_dir,
            container,
            prefix,
            concurrency=settings.archive_upload_concurrency,
            retries=settings.archive_upload_retries,
        )

    # --- journal ---------------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        return self.data_dir / JOURNAL

    def uploaded(self) -> dict[str, UploadRecord]:
        """Verified uploads by archive-relative path (a torn last line is ignored)."""
        records: dict[str, UploadRecord] = {}
        try:
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return records
        for line in lines:
            try:
                record = UploadRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a crash mid-append: that upload is verified again next run
            records[record.file] = record
        return records

    def _record(self, record: UploadRecord) -> None:
        line = json.dumps(record.__dict__, sort_keys=True) + "\n"
        with self._journal_lock:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal_path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())

    def _rewrite_journal(self, records: dict[str, UploadRecord]) -> None:
        """Replace the journal atomically (temp file, fsync, rename, directory fsync)."""
        with self._journal_lock:
            temp = self.journal_path.with_suffix(".tmp")
            with open(temp, "w", encoding="utf-8") as handle:
                for record in records.values():
                    handle.write(json.dumps(record.__dict__, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.journal_path)
            fsync_directory(self.journal_path.parent)

    # --- upload ----------------------------------------------------------------------

    def archived_files(self) -> Iterator[Path]:
        """Every file of the local archive, oldest directory first."""
        if not self.archive_root.is_dir():
            return
        for path in sorted(self.archive_root.rglob("*")):
            if path.is_file():
                yield path

    def pending(self) -> list[Path]:
        """Archived files without a verified upload."""
        done = self.uploaded()
        return [p for p in self.archived_files() if self._relative(p) not in done]

    def upload_pending(self) -> UploadReport:
        """Upload every archived file not yet uploaded, in parallel, with retries.

        Creates the container if it does not exist (and the credentials allow it).
        """
        report = UploadReport()
        files = self.pending()
        if not files:
            return report
        self._ensure_container(report)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="archive-upload") as pool:
            outcomes = list(pool.map(lambda p: self._upload_with_retries(p, report), files))
        for path, outcome in zip(files, outcomes, strict=True):
            relative = self._relative(path)
            if isinstance(outcome, Exception):
                report.failed[relative] = f"{type(outcome).__name__}: {outcome}".splitlines()[0]
            elif outcome:
                report.uploaded.append(relative)
            else:
                report.already_present.append(relative)
        log.info(
            "archive.uploaded",
            uploaded=len(report.uploaded),
            already_present=len(report.already_present),
            failed=len(report.failed),
        )
        return report

    def _ensure_container(self, report: UploadReport) -> None:
        try:
            self._retrying(self.container.create_container, report)
        except ResourceExistsError:
            pass
        except AzureError as exc:
            # A SAS limited to blobs may not create containers, or the service is down:
            # each upload then reports its own outcome.
            log.warning("archive.container_not_created", error=str(exc).splitlines()[0])

    def _retrying(self, action: Any, report: UploadReport) -> Any:
        attempt = 0
        while True:
            report.attempts += 1
            try:
                return action()
            except AzureError as exc:
                if not is_transient(exc) or attempt >= self.retries:
                    raise
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                delay *= random.uniform(0.5, 1.0)  # jitter: parallel uploads spread out
                log.warning("archive.retry", attempt=attempt + 1, delay_s=round(delay, 2),
                            error=str(exc).splitlines()[0])  # fmt: skip
                time.sleep(delay)
                attempt += 1

    def _upload_with_retries(self, path: Path, report: UploadReport) -> bool | Exception:
        """True if uploaded, False if a verified copy was already there, or the error."""
        try:
            return bool(self._retrying(lambda: self._upload_one(path), report))
        except Exception as exc:
            log.warning("archive.upload_failed", file=str(path), error=str(exc).splitlines()[0])
            return exc

    def _upload_one(self, path: Path) -> bool:
        relative = self._relative(path)
        size = path.stat().st_size
        md5 = file_md5(path)
        base = self._blob_name(relative)
        counter = 0
        while True:
            name = base if counter == 0 else _alternative_name(base, counter)
            blob = self.container.get_blob_client(name)
            present = self._blob_matches(blob, size, md5)
            if present is True:  # uploaded before a crash, or by an earlier attempt
                self._record(UploadRecord(relative, name, size, md5, _now()))
                return False
            if present is False:  # another file's bytes under that name: never overwrite
                counter += 1
                continue
            try:
                with open(path, "rb") as data:
                    blob.upload_blob(
                        data,
                        length=size,
                        overwrite=False,
                        validate_content=True,  # per-request MD5 against corruption in transit
                        content_settings=ContentSettings(
                            content_md5=bytearray(base64.b64decode(md5))
                        ),
                        max_concurrency=1,  # parallelism is across files
                    )
            except ResourceExistsError:
                continue  # appeared meanwhile (a retried request that did succeed): look again
            if self._blob_matches(blob, size, md5) is not True:
                raise ArchiveUploadError(f"{name}: uploaded blob does not match {path}")
            self._record(UploadRecord(relative, name, size, md5, _now()))
            return True

    @staticmethod
    def _blob_matches(blob: BlobClient, size: int, md5: str) -> bool | None:
        """``None`` if there is no such blob, else whether size and MD5 match."""
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            return None
        stored = props.content_settings.content_md5
        stored_b64 = base64.b64encode(bytes(stored)).decode() if stored else None
        return bool(props.size == size and stored_b64 == md5)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.archive_root).as_posix()

    def _blob_name(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    # --- retention -------------------------------------------------------------------

    def prune(
        self, retention: timedelta, *, now: datetime | None = None, dry_run: bool = False
    ) -> PruneReport:
        """Remove local archive files older than ``retention`` whose upload is verified.

        Age is the file's modification time (when it landed: moves keep it). Each
        blob is checked once more before its local copy goes; a blob that is gone
        or changed keeps the local file and drops the journal entry, so the next
        upload run sends it again.
        """
        report = PruneReport()
        cutoff = (now or datetime.now(UTC)).timestamp() - retention.total_seconds()
        records = self.uploaded()
        kept = dict(records)
        touched_dirs: set[Path] = set()
        archived = list(self.archived_files())
        # Read after listing: a listed file was archived, so written, after its journal
        # record (written first), which this read therefore sees.
        journaled = {
            (ref.source, f"{ref.batch_id}.parquet")
            for ref in journaled_landing_files(self.data_dir)
        }
        for path in archived:
            if path.stat().st_mtime >= cutoff:
                continue
            if (path.parent.parent.name, path.name) in journaled:
                report.journaled += 1
                continue
            relative = self._relative(path)
            record = records.get(relative)
            if record is None or record.size != path.stat().st_size:
                report.not_uploaded += 1
                continue
            blob = self.container.get_blob_client(record.blob)
            if self._blob_matches(blob, record.size, record.md5) is not True:
                report.mismatched.append(relative)
                kept.pop(relative, None)
                continue
            report.removed.append(relative)
            if not dry_run:
                path.unlink()
                kept.pop(relative, None)
                touched_dirs.add(path.parent)
        if dry_run:
            return report
        # Entries of files no longer here (removed now or earlier) are dropped.
        kept = {rel: rec for rel, rec in kept.items() if (self.archive_root / rel).exists()}
        if kept != records:
            self._rewrite_journal(kept)
        today = datetime.now(UTC).strftime("%Y-%m-%d")  # bronze may be moving files into it
        for directory in sorted(touched_dirs, key=lambda d: len(d.parts), reverse=True):
            fsync_directory(directory)
            if directory.name != today and not any(directory.iterdir()):
                directory.rmdir()  # an emptied day directory
        log.info(
            "archive.pruned",
            removed=len(report.removed),
            not_uploaded=report.not_uploaded,
            journaled=report.journaled,
            mismatched=len(report.mismatched),
        )
        return report


def _now() -> str:
    return datetime.now(UTC).isoformat()
