"""`lakehouse archive`: upload the landing archive to Azure Blob Storage, prune it locally."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import err, fail, load, out
from config.settings import Settings, SettingsError

if TYPE_CHECKING:
    from landing_zone.archive_upload import ArchiveUploader

archive_app = typer.Typer(
    help="Upload processed landing files (data_dir/archive) to Azure Blob Storage; prune them.",
    no_args_is_help=True,
)


def _uploader() -> tuple[Settings, ArchiveUploader]:
    # Imported here: azure-storage-blob stays out of every other command's start-up.
    from landing_zone.archive_upload import ArchiveUploader

    settings, _ = load()
    try:
        uploader = ArchiveUploader.from_settings(settings)
    except SettingsError as exc:
        fail(str(exc))
    if uploader is None:
        fail("no archive configured: set LAKEHOUSE_ARCHIVE_URI (az://<container>/<prefix>)")
    return settings, uploader


@archive_app.command("upload")
def upload() -> None:
    """Upload every archived landing file not uploaded yet (parallel, retried, verified)."""
    _, uploader = _uploader()
    report = uploader.upload_pending()
    out.print(
        f"uploaded {len(report.uploaded)}, already there {len(report.already_present)}, "
        f"failed {len(report.failed)}"
    )
    for name, error in sorted(report.failed.items()):
        err.print(f"  {name}: {error}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


@archive_app.command("prune")
def prune(
    older_than_days: Annotated[
        float | None,
        typer.Option(help="Age to keep locally (default: LAKEHOUSE_ARCHIVE_RETENTION_DAYS)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the files.")] = False,
) -> None:
    """Remove local archive files past the retention whose upload is verified."""
    settings, uploader = _uploader()
    days = older_than_days if older_than_days is not None else settings.archive_retention_days
    if days is None:
        fail("no retention: pass --older-than-days or set LAKEHOUSE_ARCHIVE_RETENTION_DAYS")
    report = uploader.prune(timedelta(days=days), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {len(report.removed)}, kept {report.not_uploaded} not uploaded, "
        f"{len(report.mismatched)} with a missing or changed blob (to upload again)"
    )
