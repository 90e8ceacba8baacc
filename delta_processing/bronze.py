"""Bronze: landing files appended to ``bronze/<source>`` exactly once.

Invariant protected here: every landing file's records appear in bronze
exactly once, whatever instant the process dies at.

How: a batch of landing files is first *claimed* by renaming it into
``landing/.inflight/<source>/<seq>/``, where ``seq`` is one more than the
batch sequence bronze has recorded (the application transaction
``lakehouse/bronze``). The Delta append records ``seq`` in the same commit.
After a crash, a leftover claim whose ``seq`` is already recorded was
committed (only the archive move is redone); otherwise it is appended again
under the same ``seq``. Only one processor runs per data directory (see
:mod:`delta_processing.processor`), so sequences never race.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import structlog
from deltalake import DeltaTable

from delta_processing.column_names import (
    INGEST_DATE,
    RESERVED_COLUMNS,
    case_variants,
    delta_safe_names,
)
from delta_processing.crashpoints import CrashPoints
from delta_processing.tables import (
    Layer,
    TableStore,
    append,
    commit_marker,
    consumed_version,
    correlation_metadata,
    table_columns,
)
from delta_processing.transient import StorageUnavailableError, brief, outage_behind
from landing_zone.formats import BatchDecodeError, concat_records, read_batch_file
from landing_zone.layout import DEAD_LETTERS, LandingLayout, fsync_directory
from landing_zone.writer import batch_time, correlation_ids_of

BRONZE_APP_ID = "lakehouse/bronze"
# A claim whose append fails this many times in a row is set aside (file quarantine).
MAX_CLAIM_ATTEMPTS = 3

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BronzeBatchResult:
    """What one bronze micro-batch did."""

    source: str
    seq: int
    files: int
    rows: int
    quarantined_files: int
    landed_at: tuple[datetime, ...] = ()  # per file read: when its writer made it durable
    correlation_ids: tuple[str, ...] = ()  # of the requests whose files this batch holds
    backlog: bool = False  # files were left waiting beyond this micro-batch's bounds


@dataclass(frozen=True)
class AppendedRows:
    """The rows one bronze commit appended, still in memory after the commit.

    Silver takes them instead of reading that commit back through the change feed
    when it consumes exactly this commit (see ``SilverPromoter.promote``): on a
    backlog, reading each commit back cost more than typing and de-duplicating it.
    """

    version: int  # the bronze commit that appended ``rows``
    rows: pl.DataFrame


@dataclass(frozen=True)
class BronzeLimits:
    """Micro-batch bounds: at most this many files / bytes / rows per bronze commit.

    Rows bound the memory of the whole micro-batch (silver and gold work on it in
    memory; during a backlog the next one is ingested meanwhile, see
    :mod:`delta_processing.lookahead`); a single file larger than a bound still goes
    alone.
    """

    max_files: int
    max_bytes: int
    max_file_bytes: int
    settle_s: float = 0.0  # hand-dropped files must be unchanged this long
    max_rows: int = 250_000


class BronzeIngestor:
    """Moves landing files of one data directory into bronze tables."""

    def __init__(
        self,
        layout: LandingLayout,
        store: TableStore,
        limits: BronzeLimits,
        crash_points: CrashPoints,
        partitioned: frozenset[str] = frozenset(),
        declared_fields: Mapping[str, list[str]] | None = None,
    ) -> None:
        """``partitioned``: sources whose bronze is partitioned by ingestion date.

        ``declared_fields``: each source's contract field names, whose spelling wins
        when a sender's case differs (``Value`` lands in the ``value`` column).
        """
        self._partitioned = partitioned
        self._declared = declared_fields or {}
        self._layout = layout
        self._store = store
        self._limits = limits
        self._crash = crash_points
        self._failures: dict[tuple[str, int], int] = {}
        self._appended: dict[str, AppendedRows] = {}

    def take_appended(self, source: str) -> AppendedRows | None:
        """The rows of ``source``'s latest bronze commit made by this ingestor, once.

        ``None`` if the latest micro-batch committed nothing or was already taken.
        """
        return self._appended.pop(source, None)

    def recover(self, source: str) -> list[BronzeBatchResult]:
        """Finish claims left by a previous run: archive committed ones, commit the rest."""
        results = []
        for seq, directory in self._layout.inflight_batches(source):
            table = self._table(source)
            committed = consumed_version(table, BRONZE_APP_ID) or 0
            if seq <= committed:
                log.info("bronze.recover.already_committed", source=source, seq=seq)
                self._archive(source, directory)
            else:
                log.info("bronze.recover.recommit", source=source, seq=seq)
                results.append(self._commit_or_give_up(source, seq, directory, table))
        return results

    def ingest_next(self, source: str) -> BronzeBatchResult | None:
        """Claim and append the next micro-batch of ``source``; ``None`` when nothing waits."""
        pending = self._layout.pending_files(source, self._limits.settle_s)
        files = self._select(pending)
        if not files:
            return None
        table = self._table(source)
        committed = consumed_version(table, BRONZE_APP_ID) or 0
        seq = committed + 1
        claim_dir = self._layout.inflight_dir(source, seq)
        claim_dir.mkdir(parents=True, exist_ok=True)
        fsync_directory(claim_dir.parent)
        for order, path in enumerate(files):
            # The prefix keeps the arrival order inside the claim (see claimed_name).
            os.rename(path, claim_dir / claimed_name(order, path.name))
        fsync_directory(claim_dir)
        self._crash.reached("after_claim")
        result = self._commit_or_give_up(source, seq, claim_dir, table)
        return replace(result, backlog=len(files) < len(pending))

    def _commit_or_give_up(
        self, source: str, seq: int, claim_dir: Path, table: DeltaTable | None
    ) -> BronzeBatchResult:
        """Commit a claim; after repeated failures set its files aside so the source moves on.

        The files go to the file quarantine with the error, from where an operator can
        drop them back into ``landing/<source>/`` once the cause is fixed.

        Only failures the claim's data may cause count toward that. A storage outage
        (object store down, timing out, throttling: see
        :mod:`delta_processing.transient`) raises :class:`StorageUnavailableError`
        without counting: the processor retries with back-off for as long as the outage
        lasts, where counting would set acknowledged files aside after a few cycles.
        """
        key = (source, seq)
        self._appended.pop(source, None)
        try:
            result = self._commit_claim(source, seq, claim_dir, table)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            if outage_behind(exc, lambda: self._table(source)):
                log.warning(
                    "bronze.storage_unavailable",
                    source=source,
                    seq=seq,
                    attempts=self._failures.get(key, 0),
                    error=brief(exc),
                )
                raise StorageUnavailableError(f"bronze {source} seq {seq}: {brief(exc)}") from exc
            attempts = self._failures.get(key, 0) + 1
            self._failures[key] = attempts
            if attempts < MAX_CLAIM_ATTEMPTS:
                raise
            error = f"bronze append failed {MAX_CLAIM_ATTEMPTS} times: {exc}"
        else:
            self._failures.pop(key, None)  # earlier failures of this claim are history
            return result
        log.error("bronze.claim_quarantined", source=source, seq=seq, error=error)
        files = sorted(p for p in claim_dir.iterdir() if p.is_file())
        for path in files:
            self._quarantine_file(source, path, error)
        claim_dir.rmdir()
        fsync_directory(claim_dir.parent)
        del self._failures[key]
        return BronzeBatchResult(source, seq, 0, 0, len(files))

    def _select(self, pending: list[Path]) -> list[Path]:
        chosen: list[Path] = []
        total = rows = 0
        for path in pending[: self._limits.max_files]:
            try:
                size = path.stat().st_size
                count = estimated_rows(path, size)
            except FileNotFoundError:
                continue
            if chosen and (
                total + size > self._limits.max_bytes or rows + count > self._limits.max_rows
            ):
                break
            chosen.append(path)
            total += size
            rows += count
        return chosen

    def _commit_claim(
        self, source: str, seq: int, claim_dir: Path, table: DeltaTable | None
    ) -> BronzeBatchResult:
        """Append the claim's files as one commit; ``table``: bronze as it was (None: new)."""
        ingested_at = datetime.now(UTC)
        spellings = self._existing_spellings(source, table)
        frames: list[tuple[pl.DataFrame, str, int | None]] = []  # (raw, name, arrival order)
        quarantined = 0
        landed_at: list[datetime] = []
        correlation_ids: list[str] = []
        files = sorted(p for p in claim_dir.iterdir() if p.is_file())
        for path in files:
            order, name = split_claimed_name(path.name)
            content = path.read_bytes()
            try:
                raw = read_batch_file(content, name, self._limits.max_file_bytes)
            except BatchDecodeError as exc:
                self._quarantine_file(source, path, str(exc))
                quarantined += 1
                continue
            landed_at.append(batch_time(name) or _modified_at(path))
            # A group-committed file holds several requests: all their ids.
            correlation_ids.extend(correlation_ids_of(content, name))
            frames.append((delta_safe_raw(raw, spellings), name, order))
        rows = 0
        if frames:
            batch = with_lineage(frames, source, ingested_at)
            partition_by = self._partition_columns(source, table)
            if partition_by:
                batch = batch.with_columns(pl.col("_ingested_at").dt.date().alias(INGEST_DATE))
            batch, positions = new_stream_records(batch, table)
            rows = batch.height
            # Through the open table where there is one: it then knows the version the
            # append landed at without reading the log again.
            append(
                table if table is not None else self._store.uri(*target_table(source)),
                batch,
                commit_marker(
                    BRONZE_APP_ID, seq, positions, **_commit_metadata(frames, correlation_ids)
                ),
                evolve_schema=True,
                cdf=True,
                partition_by=partition_by,
                storage_options=self._store.options,
            )
            self._crash.reached("after_bronze_commit")
            table = table if table is not None else self._table(source)
            if table is not None and source != DEAD_LETTERS:
                self._appended[source] = AppendedRows(table.version(), batch)
        log.info(
            "bronze.committed",
            source=source,
            seq=seq,
            files=len(frames),
            rows=rows,
            quarantined_files=quarantined,
            correlation_ids=correlation_ids,
        )
        self._archive(source, claim_dir)
        return BronzeBatchResult(
            source, seq, len(frames), rows, quarantined, tuple(landed_at), tuple(correlation_ids)
        )

    def _table(self, source: str) -> DeltaTable | None:
        return self._store.open(*target_table(source))

    def _partition_columns(self, source: str, table: DeltaTable | None) -> list[str]:
        """Bronze partitioning: the table's own once it exists (raw data is never stopped
        for a layout change; rewriting bronze is an explicit operation)."""
        wanted = [INGEST_DATE] if source in self._partitioned else []
        if table is None:
            return wanted
        current = list(table.metadata().partition_columns)
        if current != wanted:
            log.warning("bronze.partitioning_kept", source=source, table=current, contract=wanted)
        return current

    def _existing_spellings(self, source: str, table: DeltaTable | None) -> dict[str, str]:
        """Lower-cased name -> spelling of the raw columns bronze already has."""
        declared = {n.lower(): n for n in self._declared.get(source, [])}
        if table is None:
            return declared
        names = table_columns(table)
        existing = {n.lower(): n for n in names if n.lower() not in RESERVED_COLUMNS}
        return {**declared, **existing}  # the table's spelling is what it already holds

    def _archive(self, source: str, claim_dir: Path) -> None:
        """Move a committed claim's files out of the landing zone, then drop the claim."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        target = self._layout.archive_dir(source, day)
        target.mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(sorted(claim_dir.iterdir())):
            shutil.move(path, free_path(target, split_claimed_name(path.name)[1]))
            if index == 0:
                self._crash.reached("mid_archive")
        fsync_directory(target)
        claim_dir.rmdir()
        fsync_directory(claim_dir.parent)

    def _quarantine_file(self, source: str, path: Path, error: str) -> None:
        """Set aside a file that cannot be read at all, with an error file beside it."""
        target_dir = self._layout.quarantine_files_dir(source)
        target_dir.mkdir(parents=True, exist_ok=True)
        name = split_claimed_name(path.name)[1]
        report = {
            "file": name,
            "source": source,
            "error": error,
            "quarantined_at": datetime.now(UTC).isoformat(),
        }
        target = free_path(target_dir, name)
        error_path = target_dir / f"{target.name}.error.json"
        error_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
        shutil.move(path, target)
        fsync_directory(target_dir)
        log.warning("bronze.file_quarantined", source=source, file=name, error=error)


# Text records are rarely shorter than this; compressed ones expand about this much.
_MIN_TEXT_ROW_BYTES = 64
_GZIP_RATIO = 5


def estimated_rows(path: Path, size: int) -> int:
    """Rows in a landing file: exact for Parquet (its footer), an upper estimate otherwise."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            return int(pq.read_metadata(path).num_rows)
        except (OSError, pa.ArrowInvalid):
            return 1  # unreadable: bronze quarantines it, alone or not
    expanded = size * _GZIP_RATIO if name.endswith(".gz") else size
    return max(1, expanded // _MIN_TEXT_ROW_BYTES)


def _modified_at(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _commit_metadata(frames: Sequence[object], correlation_ids: list[str]) -> dict[str, str]:
    """Custom commit metadata of a bronze batch: file count, and the requests it holds."""
    return {"lakehouse.files": str(len(frames)), **correlation_metadata(correlation_ids)}


def target_table(source: str) -> tuple[Layer, str]:
    """Where a landing source's files are appended: its bronze table, or the dead letters."""
    return ("quarantine", DEAD_LETTERS) if source == DEAD_LETTERS else ("bronze", source)


KAFKA_POSITION = ("kafka_topic", "kafka_partition", "kafka_offset")
# The topic's id (the Kafka topic UUID), when the bridge knew it: a topic deleted and
# created again under its name has a new one, and its offsets start again at 0.
KAFKA_TOPIC_ID = "kafka_topic_id"


def stream_app_id(topic: str, partition: str, topic_id: str | None = None) -> str:
    """Application-transaction id recording how far bronze holds a Kafka partition (of
    one incarnation of the topic, where its id is known)."""
    if topic_id is None:
        return f"lakehouse/kafka/{topic}/{partition}"
    return f"lakehouse/kafka/{topic}@{topic_id}/{partition}"


def new_stream_records(
    batch: pl.DataFrame, table: DeltaTable | None
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Drop Kafka records bronze already holds; return the rest and the new positions.

    The bridge is at-least-once (offsets are committed after the landing file is
    durable), so a crash can land a message twice. Bronze records, per topic
    partition, the highest offset it holds in the same commit as the rows (as
    kafka-delta-ingest does), so a re-delivered message never makes a second row.
    Positions are per incarnation of a topic (``kafka_topic_id``): the offsets of a
    topic deleted and created again start at 0, and comparing them with those of the
    old one would drop every new message as already held.
    """
    if not set(KAFKA_POSITION) <= set(batch.columns):
        return batch, {}
    added_id = KAFKA_TOPIC_ID not in batch.columns  # landed before the bridge stamped ids
    if added_id:
        batch = batch.with_columns(pl.lit(None, pl.String).alias(KAFKA_TOPIC_ID))
    stream = ["kafka_topic", KAFKA_TOPIC_ID, "kafka_partition"]
    offset = pl.col("kafka_offset").cast(pl.Int64, strict=False)
    position = pl.struct(*stream, "\x01offset")
    # Only records with a Kafka position can be re-deliveries: rows of other writers in
    # the same micro-batch (HTTP, MQTT, dropped files) have null positions, which
    # `unique` would collapse into one row.
    positioned = pl.all_horizontal(
        pl.col(c).is_not_null() for c in ("kafka_topic", "kafka_partition", "\x01offset")
    )
    keyed = batch.with_columns(offset.alias("\x01offset")).filter(
        ~positioned | position.is_first_distinct()
    )
    held = {
        (topic, topic_id, partition): table.transaction_version(
            stream_app_id(topic, partition, topic_id)
        )
        if table is not None
        else None
        for topic, topic_id, partition in keyed.select(stream).unique().iter_rows()
        if topic is not None and partition is not None
    }
    floors = pl.DataFrame(
        {
            "kafka_topic": [t for t, _, _ in held],
            KAFKA_TOPIC_ID: [i for _, i, _ in held],
            "kafka_partition": [p for _, _, p in held],
            "\x01held": [-1 if v is None else v for v in held.values()],
        },
        schema={
            "kafka_topic": pl.String,
            KAFKA_TOPIC_ID: pl.String,
            "kafka_partition": pl.String,
            "\x01held": pl.Int64,
        },
    )
    # Rows without a full position (other writers; or a record that merely has a field
    # called kafka_offset) are never re-deliveries: comparing them would drop them.
    fresh = keyed.join(floors, on=stream, how="left", nulls_equal=True).filter(
        ~positioned | (pl.col("\x01offset") > pl.col("\x01held"))
    )
    positions = {
        stream_app_id(topic, partition, topic_id): int(top)
        for topic, topic_id, partition, top in fresh.group_by(stream)
        .agg(pl.col("\x01offset").max())
        .iter_rows()
        if topic is not None and partition is not None and top is not None
    }
    fresh = fresh.drop("\x01offset", "\x01held")
    return (fresh.drop(KAFKA_TOPIC_ID) if added_id else fresh), positions


def claimed_name(order: int, name: str) -> str:
    """A landing file's name inside a claim: its arrival position, ``~``, its name."""
    return f"{order:06d}~{name}"


def split_claimed_name(claimed: str) -> tuple[int | None, str]:
    """``(arrival position, original name)`` of a claimed file (position unknown: None)."""
    head, sep, rest = claimed.partition("~")
    if sep and head.isdigit() and len(head) == 6:
        return int(head), rest
    return None, claimed


def free_path(directory: Path, name: str) -> Path:
    """``directory/name``, or ``directory/<head>~<n>.<rest>`` if taken: never overwrite.

    Hand-dropped files reuse names (``export.json`` every day); archive and quarantine
    must keep every one of them.
    """
    candidate = directory / name
    head, dot, rest = name.partition(".")
    counter = 1
    while candidate.exists():
        candidate = directory / f"{head}~{counter}{dot}{rest}"
        counter += 1
    return candidate


def merge_case_variants(raw: pl.DataFrame) -> pl.DataFrame:
    """Fold a field spelled several ways (``ID`` / ``id``) into one column, when no
    record uses two spellings at once; otherwise keep them apart (suffixed later)."""
    for names in case_variants(raw.columns):
        clash = raw.select(
            (pl.sum_horizontal([pl.col(n).is_not_null() for n in names]) > 1).any()
        ).item()
        if not clash:
            raw = raw.with_columns(pl.coalesce(names).alias(names[0])).drop(names[1:])
    return raw


def delta_safe_raw(raw: pl.DataFrame, spellings: dict[str, str]) -> pl.DataFrame:
    """A landing file's raw records with field names made Delta-safe.

    ``spellings`` carries the column spellings of the table and of earlier files
    of the batch (see :func:`delta_safe_names`).
    """
    renamed = merge_case_variants(raw)
    return renamed.rename(delta_safe_names(renamed.columns, spellings))


def with_lineage(
    files: Sequence[tuple[pl.DataFrame, str, int | None]], source: str, ingested_at: datetime
) -> pl.DataFrame:
    """The raw records of a batch's files (``(records, landing file name, arrival
    order)``, names already Delta-safe) as one frame, with bronze's lineage columns:
    ``_source``, ``_landing_file``, ``_batch_id`` (the file name up to its first dot),
    ``_row`` (the record's position in its file), ``_ingested_at``, ``_file_order``.

    Made once for the whole batch from one row per file: a batch holds up to a thousand
    files, and expressions evaluated per file cost more than their rows.
    """
    records = concat_records([frame for frame, _, _ in files])
    heights = pl.Series([frame.height for frame, _, _ in files], dtype=pl.Int64)
    ends = heights.cum_sum()
    names = [name for _, name, _ in files]
    per_file = pl.DataFrame(
        {
            "_landing_file": names,
            "_batch_id": [name.split(".", 1)[0] for name in names],
            "_file_order": pl.Series([order for _, _, order in files], dtype=pl.Int64),
            "\x01start": ends - heights,
        }
    )
    # Each record's file: how many files end at or before its position.
    position = pl.int_range(records.height, dtype=pl.Int64, eager=True)
    spread = per_file[ends.search_sorted(position, side="right")]
    return pl.concat([records, spread], how="horizontal").select(
        *records.columns,
        pl.lit(source, pl.String).alias("_source"),
        "_landing_file",
        "_batch_id",
        (position - pl.col("\x01start")).alias("_row"),
        pl.lit(ingested_at).dt.cast_time_unit("us").alias("_ingested_at"),
        "_file_order",
    )
