"""The ``lakehouse`` command: one entry point for every process of the platform."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.archive import archive_app
from cli.bridges import bridge_app, bridge_collector, configured_bridges, start_bridges
from cli.common import err, fail, load, out, serve_metrics
from config.contracts import ContractError, ContractRegistry
from config.settings import Settings, SettingsError, load_settings
from delta_processing.expectations import check_contracts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from prometheus_client.registry import Collector

    from delta_processing.operations import OperationRunner
    from delta_processing.processor import ProcessorLock
    from delta_processing.tables import Layer

app = typer.Typer(
    help="Lakehouse ingestion platform: landing -> bronze -> silver -> gold -> DuckDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tokens_app = typer.Typer(help="Manage API bearer tokens.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
sources_app = typer.Typer(help="Source contracts: list them, or validate every contract file.")
app.add_typer(sources_app, name="sources")
retention_app = typer.Typer(help="Expire old rows per layer.", no_args_is_help=True)
app.add_typer(retention_app, name="retention")
app.add_typer(bridge_app, name="bridge")
app.add_typer(archive_app, name="archive")
replay_app = typer.Typer(
    help="Send set-aside rows back through the pipeline.", no_args_is_help=True
)
app.add_typer(replay_app, name="replay")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    arrow = "arrow"
    parquet = "parquet"


def _ensure_admin_token(settings: Settings) -> None:
    """On a first start with no tokens, create an admin token and show it once."""
    from api.tokens import TokenStore

    store = TokenStore(settings.tokens_file)
    if store.records():
        return
    secret = store.create("admin", ["admin"])
    err.print(
        "[bold yellow]Created the first admin token. It is shown only this once; "
        "store it safely:[/]"
    )
    out.print(secret, highlight=False, soft_wrap=True)


def _serve(
    settings: Settings,
    contracts: ContractRegistry,
    collectors: Sequence[Collector] = (),
    operations: OperationRunner | None = None,
    workers: int = 1,
) -> None:
    """Serve the API until SIGTERM/SIGINT, then return so callers can shut down cleanly.

    ``workers`` > 1 runs that many processes behind the one port, each building its app
    from the settings of the environment (:mod:`cli.worker`).
    """
    import signal

    import uvicorn

    from api.app import create_app

    if workers > 1:
        uvicorn.run(
            "cli.worker:create_worker_app",
            factory=True,
            workers=workers,
            host=settings.api_host,
            port=settings.api_port,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
        return
    config = uvicorn.Config(
        create_app(settings, contracts, collectors, operations),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with a
    # no-op handler in place that re-raise returns here instead of killing us.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run()


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="API bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="API port.")] = None,
) -> None:
    """Run everything in one process: the API and the processor, on the local data dir."""
    from delta_processing.operations import ProcessorRunner
    from delta_processing.processor import Processor, ProcessorLockedError

    settings, contracts = load(api_host=host, api_port=port)
    _ensure_admin_token(settings)
    processor = Processor(settings, contracts)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run_processor() -> None:
        try:
            processor.run_forever(stop)
        except BaseException as exc:
            failure.append(exc)
            if not isinstance(exc, ProcessorLockedError):
                structlog.get_logger(__name__).exception("processor.crashed")

    worker = threading.Thread(target=run_processor, name="lakehouse-processor", daemon=True)
    worker.start()
    # Serve nothing unless the processor really runs (e.g. another one holds the data dir).
    while not processor.started.wait(timeout=0.05):
        if failure or not worker.is_alive():
            reason = failure[0] if failure else "processor thread stopped"
            if isinstance(reason, ProcessorLockedError):
                fail(str(reason), code=1)
            fail(f"processor failed to start: {reason}", code=1)
    configured = configured_bridges(settings)
    bridges = start_bridges(configured, stop)
    err.print(
        f"lakehouse up: API on http://{settings.api_host}:{settings.api_port} "
        f"(docs at /docs), data in {settings.data_dir}"
        + (
            f", bridges: {', '.join(t.name.removeprefix('lakehouse-') for t in bridges)}"
            if bridges
            else ""
        )
    )
    try:
        _serve(
            settings,
            contracts,
            [bridge_collector(configured), processor.metrics],
            ProcessorRunner(processor),
        )
    finally:
        stop.set()  # bridges flush their open batch; the processor finishes its cycle
        processor.wake.set()
        for thread in [*bridges, worker]:
            thread.join(timeout=30)
    if failure:
        fail(f"processor stopped: {failure[0]}", code=1)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes behind the port (default LAKEHOUSE_API_WORKERS)."),
    ] = None,
) -> None:
    """Run only the ingestion/query API."""
    settings, contracts = load(api_host=host, api_port=port, api_workers=workers)
    _serve(settings, contracts, workers=settings.api_workers)


@app.command()
def process(
    once: Annotated[
        bool, typer.Option("--once", help="Drain the landing zone, then exit.")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics of the processor on this port (API host)."),
    ] = None,
) -> None:
    """Run only the processor (landing -> bronze -> silver -> gold)."""
    import signal

    from prometheus_client import CollectorRegistry

    from delta_processing.processor import Processor, ProcessorLockedError
    from landing_zone.backlog import BacklogCollector
    from landing_zone.layout import LandingLayout

    settings, contracts = load()
    processor = Processor(settings, contracts)
    if metrics_port is not None:
        registry = CollectorRegistry()
        registry.register(processor.metrics)
        registry.register(BacklogCollector(LandingLayout(settings.data_dir)))
        serve_metrics(metrics_port, settings, registry)
    try:
        if once:
            report = processor.run_once()
            err.print(
                f"bronze batches: {len(report.bronze)}, silver promotions: "
                f"{len(report.silver)}, gold refreshes: {len(report.gold)}"
            )
            if report.failures:
                fail("; ".join(report.failures), code=1)
            return
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            stop.set()
            processor.wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        processor.run_forever(stop)
    except ProcessorLockedError as exc:
        fail(str(exc), code=1)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SELECT over <layer>.<table> views.")],
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Output format.")
    ] = OutputFormat.table,
    destination: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the result to this file (default: stdout)."),
    ] = None,
) -> None:
    """Run read-only SQL over the lakehouse tables (e.g. gold.readings_hourly)."""
    from analytics.query import QueryError, QueryLimits, run_query
    from analytics.results import RESULT_FORMATS, UnencodableResult, encode_result, to_frame
    from delta_processing.tables import TableStore

    settings, _ = load()
    binary = output in (OutputFormat.arrow, OutputFormat.parquet)
    if binary and destination is None and sys.stdout.isatty():
        fail(f"--format {output.value} is binary: pass --output FILE or redirect stdout")
    limits = QueryLimits.from_settings(settings)
    try:
        result = run_query(TableStore.from_settings(settings), query, limits)
    except QueryError as exc:
        fail(str(exc), code=1)
    if output is not OutputFormat.table:
        fmt = next(f for f in RESULT_FORMATS if f == output.value)
        try:
            content = encode_result(result, fmt)
        except UnencodableResult as exc:
            fail(str(exc), code=1)
        if output is OutputFormat.json:
            content += b"\n"
        if destination is not None:
            destination.write_bytes(content)
            err.print(f"{result.num_rows} row(s) written to {destination}")
        else:
            sys.stdout.buffer.write(content)
            sys.stdout.flush()
        return
    frame = to_frame(result)
    table = Table(*frame.columns, show_lines=False)
    for row in frame.iter_rows():
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)
    err.print(f"{frame.height} row(s)")


@app.command()
def tables() -> None:
    """List every Delta table with its version, files and rows."""
    from analytics.catalog import snapshot_tables
    from delta_processing.tables import TableStore

    settings, _ = load()
    table = Table("table", "version", "files", "rows", "columns")
    for snap in snapshot_tables(TableStore.from_settings(settings)):
        rows = snap.table.count()
        table.add_row(
            snap.qualified_name,
            str(snap.version),
            str(len(snap.file_uris)),
            str(rows),
            str(len(snap.schema)),
        )
    out.print(table)


@sources_app.callback(invoke_without_command=True)
def sources_list(ctx: typer.Context) -> None:
    """List every source with its contract (fields, keys, sequence, expectations, gold)."""
    if ctx.invoked_subcommand is not None:
        return
    _, contracts = load()
    table = Table("source", "fields", "keys", "event time", "sequence", "expectations", "gold")
    for contract in contracts.values():
        fields = ", ".join(
            f"{f.name}:{f.type}{'' if f.name in contract.required_fields else '?'}"
            for f in contract.fields
        )
        expectations = ", ".join(f"{e.name} ({e.action})" for e in contract.expectations)
        table.add_row(
            contract.name,
            fields,
            ", ".join(contract.keys),
            contract.event_time,
            contract.sequence or "",
            expectations,
            ", ".join(g.name for g in contract.gold),
        )
    out.print(table)


@sources_app.command("validate")
def sources_validate() -> None:
    """Check every contract file; print each problem as <file>:<line>: <problem>."""
    from config.contracts import contract_files, load_contract_file, validate_contract_files

    try:
        settings = load_settings()
    except SettingsError as exc:
        fail(str(exc))
    if settings.contracts_dir is not None and not settings.contracts_dir.is_dir():
        fail(f"{settings.contracts_dir}: contracts directory does not exist")
    files = contract_files(settings.contracts_dir)
    problems = validate_contract_files(files)
    for path in files:  # rules that need the typed schema (SQL predicates)
        try:
            contract = load_contract_file(path)
        except ContractError:
            continue  # already reported above
        try:
            check_contracts([contract])
        except ContractError as exc:
            problems.append(f"{path}: {exc}")
    for problem in problems:
        err.print(problem, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    out.print(f"{len(files)} contract file(s) valid")


@app.command()
def quality(
    source: Annotated[str | None, typer.Argument(help="Only this source.")] = None,
    last: Annotated[int, typer.Option(help="How many recent batches.")] = 20,
) -> None:
    """Show per-batch data-quality metrics (rows in, passed, warned, dropped, quarantined)."""
    from analytics.quality import read_quality
    from delta_processing.tables import TableStore

    settings, _ = load()
    frame = read_quality(TableStore.from_settings(settings), source, last)
    table = Table(
        "source", "bronze v", "evaluated at", "in", "passed", "warned", "dropped",
        "quarantined", "failed expectations",
    )  # fmt: skip
    for row in frame.iter_rows(named=True):
        failures = ", ".join(
            f"{e['name']}={e['failed']}" for e in row["expectations"] if e["failed"]
        )
        table.add_row(
            row["source"],
            str(row["bronze_version"]),
            row["evaluated_at"].isoformat(timespec="seconds"),
            *(
                str(row[k])
                for k in (
                    "rows_in",
                    "rows_passed",
                    "rows_warned",
                    "rows_dropped",
                    "rows_quarantined",
                )
            ),
            failures,
        )
    out.print(table)


def _holding_processor_lock(settings: Settings, operation: str) -> ProcessorLock:
    """The processor lock, so a rebuild never races the pipeline's own commits (a
    processor started meanwhile waits for ``operation`` to end)."""
    from delta_processing.processor import ProcessorLock, ProcessorLockedError

    lock = ProcessorLock(settings.data_dir, role=f"operation {operation}")
    try:
        lock.acquire()
    except ProcessorLockedError as exc:
        busy = exc.holder == "processor"
        hint = "stop `lakehouse up`/`process` first" if busy else "retry when it has finished"
        fail(f"{exc} ({hint})", code=1)
    return lock


def _spinner(description: str) -> Progress:
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=err, transient=True)  # fmt: skip
    progress.add_task(description, total=None)
    return progress


@app.command()
def refresh(
    table: Annotated[str, typer.Argument(help="silver/<source> or gold/<table>.")],
) -> None:
    """Rebuild a silver or gold table in full from its upstream (not if protected)."""
    from delta_processing.refresh import RefreshRefused
    from delta_processing.refresh import refresh as rebuild
    from delta_processing.tables import TableStore

    settings, contracts = load()
    layer, _, name = table.partition("/")
    if layer == "silver" and name in contracts:
        contract, target = contracts[name], "silver"
    elif layer == "gold":
        owner = next((c for c in contracts.values() if any(g.name == name for g in c.gold)), None)
        if owner is None:
            fail(f"no declared gold table {name!r}")
        contract, target = owner, name
    else:
        fail(f"cannot refresh {table!r}: use silver/<source> or gold/<table>")
    lock = _holding_processor_lock(settings, "refresh")
    try:
        with _spinner(f"rebuilding {table}"):
            result = rebuild(TableStore.from_settings(settings), contract, target)
    except RefreshRefused as exc:
        fail(str(exc), code=1)
    finally:
        lock.release()
    out.print(
        f"rebuilt {result.table}: {result.rows} row(s) from upstream v{result.upstream_version}"
    )


@app.command()
def backfill(
    source: Annotated[str, typer.Argument(help="The source to reprocess.")],
    start: Annotated[datetime, typer.Option("--from", help="Ingested at or after (UTC).")],
    end: Annotated[datetime, typer.Option("--to", help="Ingested before (UTC).")],
) -> None:
    """Re-judge the bronze rows ingested in [--from, --to) against the current contract."""
    from delta_processing.refresh import RefreshRefused
    from delta_processing.refresh import backfill as reprocess
    from delta_processing.tables import TableStore

    settings, contracts = load()
    if source not in contracts:
        fail(f"unknown source {source!r}")
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    if end <= start:
        fail("--to must be after --from")
    lock = _holding_processor_lock(settings, "backfill")
    try:
        with _spinner(f"backfilling {source}"):
            result = reprocess(TableStore.from_settings(settings), contracts[source], start, end)
    except RefreshRefused as exc:
        fail(str(exc), code=1)
    finally:
        lock.release()
    out.print(f"backfilled {source}: {result.rows} row(s) upserted into silver")


def _parse_table(reference: str) -> tuple[Layer, str]:
    from delta_processing.tables import LAYERS

    layer, _, name = reference.partition("/")
    if layer not in LAYERS or not name:
        fail(f"{reference!r} is not <layer>/<table> with layer one of {', '.join(LAYERS)}")
    return layer, name


@app.command()
def optimize(
    table: Annotated[
        str | None, typer.Argument(help="<layer>/<table>; all tables if omitted.")
    ] = None,
    zorder: Annotated[
        list[str] | None, typer.Option("--zorder", help="Z-order by these columns (repeatable).")
    ] = None,
) -> None:
    """Compact small files (and optionally Z-order), checkpoint and clean the Delta log."""
    from delta_processing.housekeeping import maintain_all
    from delta_processing.maintenance import compact, policy_for
    from delta_processing.tables import TableStore

    settings, contracts = load()
    store = TableStore.from_settings(settings)
    policy = policy_for(settings)
    lock = _holding_processor_lock(settings, "optimize")
    try:
        with _spinner("optimizing"):
            if table is None:
                if zorder:
                    fail("--zorder needs a table")
                reports = maintain_all(store, contracts, policy)
                lines = [f"{r.layer}/{r.name}: {r.compaction.files_removed} -> "
                         f"{r.compaction.files_added} file(s)" for r in reports]  # fmt: skip
            else:
                layer, name = _parse_table(table)
                target = store.open(layer, name)
                if target is None:
                    fail(f"no table {table}")
                result = compact(target, policy, zorder=zorder or None)
                lines = [f"{table}: {result.files_removed} -> {result.files_added} file(s)"]
    finally:
        lock.release()
    for line in lines:
        out.print(line)


@app.command()
def vacuum(
    table: Annotated[
        str | None, typer.Argument(help="<layer>/<table>; all tables if omitted.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the files.")] = False,
) -> None:
    """Delete files no longer in their tables and older than the vacuum retention."""
    from delta_processing.housekeeping import all_tables, vacuum_tables
    from delta_processing.maintenance import policy_for
    from delta_processing.tables import TableStore

    settings, contracts = load()
    store = TableStore.from_settings(settings)
    targets = list(all_tables(store)) if table is None else [_parse_table(table)]
    lock = _holding_processor_lock(settings, "vacuum")
    try:
        with _spinner("vacuuming"):
            results = vacuum_tables(store, contracts, policy_for(settings), targets,
                                    dry_run=dry_run)  # fmt: skip
    finally:
        lock.release()
    verb = "would delete" if dry_run else "deleted"
    for result in results:
        out.print(f"{result.table}: {verb} {len(result.files)} file(s)")
        for name in result.files if dry_run else []:
            out.print(f"  {name}", highlight=False)


@retention_app.command("apply")
def retention_apply() -> None:
    """Delete rows older than the configured retention of their layer (then vacuum reclaims)."""
    from delta_processing.retention import RetentionPolicy, apply_retention
    from delta_processing.tables import TableStore

    settings, contracts = load()
    lock = _holding_processor_lock(settings, "retention")
    try:
        with _spinner("expiring old rows"):
            results = apply_retention(
                TableStore.from_settings(settings),
                list(contracts.values()),
                RetentionPolicy.from_settings(settings),
                datetime.now(UTC),
            )
    finally:
        lock.release()
    for result in results:
        out.print(f"{result.table}: {result.rows_deleted} row(s) before {result.cutoff:%Y-%m-%d}")
    if not results:
        out.print("nothing expired")


@replay_app.command("quarantine")
def replay_quarantine_command(
    source: Annotated[str, typer.Argument(help="Source whose quarantined rows to replay.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count the rows.")] = False,
) -> None:
    """Replay quarantined rows of a source (after fixing its contract), exactly once."""
    from delta_processing.replay import replay_quarantine
    from delta_processing.tables import TableStore

    settings, contracts = load()
    if source not in contracts:
        fail(f"unknown source {source!r}")
    # Its delete must not race quarantine appends.
    lock = _holding_processor_lock(settings, "replay")
    try:
        result = replay_quarantine(
            settings.data_dir, source, dry_run=dry_run, store=TableStore.from_settings(settings)
        )
    finally:
        lock.release()
    verb = "would replay" if dry_run else "replayed"
    out.print(
        f"{verb} {result.rows} row(s) of {source}"
        + (f" as landing batch {result.batch_id}" if result.batch_id and result.rows else "")
    )


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="A name to recognise the token by.")],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", "-s", help="admin, query, metrics, ingest:* or ingest:<source>; repeatable."
        ),
    ],
    expires_in: Annotated[
        str | None,
        typer.Option("--expires-in", help="Lifetime, e.g. 30d, 12h, 90s (default: never)."),
    ] = None,
    rate_rows: Annotated[
        float | None,
        typer.Option("--rate-rows", help="Ingest rows/s for this token (overrides the setting)."),
    ] = None,
    rate_bytes: Annotated[
        float | None,
        typer.Option("--rate-bytes", help="Ingest bytes/s for this token (overrides the setting)."),
    ] = None,
) -> None:
    """Create a token; its secret is printed once, as the only line on stdout."""
    from api.tokens import TokenError, TokenStore, parse_duration

    settings, _ = load()
    try:
        secret = TokenStore(settings.tokens_file).create(
            name,
            scope,
            expires_in_s=None if expires_in is None else parse_duration(expires_in),
            rate_rows_per_s=rate_rows,
            rate_bytes_per_s=rate_bytes,
        )
    except TokenError as exc:
        fail(str(exc))
    sys.stdout.write(secret + "\n")


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """List tokens: name, scopes, status, created, last used, expiry (never secrets)."""
    from api.tokens import TokenStore, describe, info

    settings, _ = load()
    records = TokenStore(settings.tokens_file).records()
    if as_json:
        import json

        views = [info(record).model_dump(mode="json") for record in records]
        sys.stdout.write(json.dumps({"tokens": views}, indent=2) + "\n")
        return
    columns = ["name", "scopes", "status", "created_at", "last_used_at", "expires_at"]
    columns += ["previous_secret_valid_until", "rate_limits"]
    table = Table(*columns)
    for record in records:
        summary = describe(record)
        table.add_row(*(summary[column] for column in columns))
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Argument(help="The token to revoke.")]) -> None:
    """Revoke a token now: its secrets get 401 in every running API at once."""
    from api.tokens import TokenError, TokenStore

    settings, _ = load()
    try:
        TokenStore(settings.tokens_file).revoke(name)
    except TokenError as exc:
        fail(str(exc))
    err.print(f"revoked token {name!r}", highlight=False)


@tokens_app.command("rotate")
def tokens_rotate(
    name: Annotated[str, typer.Argument(help="The token to give a new secret.")],
    grace: Annotated[
        str | None,
        typer.Option(
            "--grace",
            help="How long the old secret keeps working, e.g. 1h, 90s, 0 "
            "(default: LAKEHOUSE_TOKEN_ROTATION_GRACE_S).",
        ),
    ] = None,
) -> None:
    """Issue a new secret (printed once, as the only line on stdout); the old one expires."""
    from api.tokens import TokenError, TokenStore, parse_duration

    settings, _ = load()
    try:
        grace_s = settings.token_rotation_grace_s if grace is None else parse_duration(grace)
        secret, record = TokenStore(settings.tokens_file).rotate(name, grace_s)
    except TokenError as exc:
        fail(str(exc))
    until = max(r.valid_until for r in record.retired)
    err.print(
        f"rotated token {name!r}; the old secret works until {until.isoformat(timespec='seconds')}",
        highlight=False,
    )
    sys.stdout.write(secret + "\n")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
