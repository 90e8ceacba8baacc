"""Where the Delta tables live: on local disk under the data directory, or on object storage.

``LAKEHOUSE_STORAGE_URI`` moves the tables (bronze, silver, gold, quarantine, _meta)
to Azure Blob Storage (``az://``, ``abfs[s]://``), S3-compatible storage (``s3://``)
or Google Cloud Storage (``gs://``); deltalake reaches them through object_store
with the storage options built here. Everything that must be on a local file
system stays under ``data_dir``: the landing zone (watchdog needs inotify), the
processor lock, replay intents, token hashes.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pyarrow.fs as pafs
from deltalake.fs import DeltaStorageHandler

from config.settings import Settings

AZURE_SCHEMES = ("az", "abfs", "abfss", "adl", "azure")


def is_local_uri(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The path of a local URI (``file://`` prefix and %-escapes removed)."""
    return Path(unquote(uri.removeprefix("file://")))


def storage_root(settings: Settings) -> Path | str:
    """The root under which ``<layer>/<table>`` live: a local path or an object-store URI."""
    uri = settings.storage_uri
    if uri is None:
        return settings.data_dir
    if is_local_uri(uri):
        return local_path(uri).expanduser()
    return uri


def storage_options(settings: Settings) -> dict[str, str]:
    """deltalake ``storage_options`` for the tables: dedicated credentials, then explicit options.

    Explicit ``LAKEHOUSE_STORAGE_OPTIONS`` entries win over the dedicated settings.
    The values are secrets: callers must not log them.
    """
    options: dict[str, str] = {}
    uri = settings.storage_uri or ""
    if uri.split("://", 1)[0].lower() in AZURE_SCHEMES:
        if settings.azure_storage_account_name:
            options["account_name"] = settings.azure_storage_account_name
        if settings.azure_storage_account_key is not None:
            options["account_key"] = settings.azure_storage_account_key.get_secret_value()
    options.update({k: v.get_secret_value() for k, v in settings.storage_options.items()})
    return options


def remote_filesystem(root_uri: str, options: dict[str, str] | None) -> pafs.FileSystem:
    """A pyarrow file system rooted at ``root_uri`` on object storage (paths relative to it).

    Built on deltalake's own object_store handler, so it understands exactly the
    URIs and options the Delta tables are opened with.
    """
    return pafs.PyFileSystem(DeltaStorageHandler(root_uri, options))
