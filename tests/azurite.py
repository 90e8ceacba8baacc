"""Test support: Azurite (Microsoft's Azure Storage emulator), blob service only, on a free port.

Azurite is the npm package ``azurite``; ``make system-deps`` installs it into
``.cache/npm`` under the repository (or use a global ``npm install -g azurite``).
A missing Azurite fails the tests loudly: they are not skipped.

Its data lives in ``--location``, which survives :meth:`Azurite.restart`, so a
restart tests reconnection and retries with nothing lost, as with a real outage.

deltalake/object_store with ``use_emulator`` talks to ``AZURITE_BLOB_STORAGE_URL``
(default ``http://127.0.0.1:10000``): :meth:`Azurite.emulator_env` points it at
this instance's port. (The ``endpoint`` option also reaches a custom port, but
then object_store lists the Delta log with the ``startFrom`` parameter, which
Azurite 3.35 ignores, and the third commit of every table fails.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.helpers import REPO, free_port, wait_listening

ACCOUNT = "devstoreaccount1"
# The emulator's well-known, public account key (documented by Microsoft).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
LOCAL_AZURITE = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "azurite-blob"
# Azurite keeps its blob metadata in LokiJS, saved to --location every 5 s (3.35:
# LokiBlobMetadataStore, autosaveInterval 5000) and on SIGTERM: a SIGKILL loses the
# writes of the last seconds it acknowledged. Idle this long, it has saved them all.
AUTOSAVE_S = 5.0


def azurite_binary() -> str:
    """The ``azurite-blob`` executable: the repository's npm cache, else one on PATH."""
    if LOCAL_AZURITE.exists():
        return str(LOCAL_AZURITE)
    found = shutil.which("azurite-blob")
    if found is None:
        raise RuntimeError(
            "azurite-blob is not installed: run `make system-deps` (npm install --prefix "
            ".cache/npm azurite) or `npm install -g azurite`"
        )
    return found


class Azurite:
    """One ``azurite-blob`` process; port and data directory are kept across restarts."""

    def __init__(self, location: Path, port: int | None = None) -> None:
        self.location = location
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = location.parent / f"azurite-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def blob_url(self) -> str:
        """The blob service root (``AZURITE_BLOB_STORAGE_URL``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def connection_string(self) -> str:
        """An azure-storage-blob connection string for this instance."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_url}/{ACCOUNT};"
        )

    @property
    def storage_options(self) -> dict[str, str]:
        """deltalake storage options for this emulator (with :meth:`emulator_env` set)."""
        return {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY, "use_emulator": "true"}

    def emulator_env(self) -> dict[str, str]:
        """Environment that points object_store's emulator mode at this instance."""
        return {"AZURITE_BLOB_STORAGE_URL": self.blob_url}

    def start(self, timeout: float = 30.0) -> None:
        """Start Azurite and wait until it accepts connections."""
        self.location.mkdir(parents=True, exist_ok=True)
        command = [
            azurite_binary(),
            "--blobHost", self.host,
            "--blobPort", str(self.port),
            "--location", str(self.location),
            "--disableTelemetry",
            "--skipApiVersionCheck",  # newer SDKs send API versions Azurite does not know yet
            "--silent",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_listening(self._proc, "azurite", self.host, [self.port], self.log_text, timeout)

    def stop(self) -> None:
        """Stop Azurite (SIGTERM to its process group; node may run it in a child)."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL Azurite, as a crash: nothing saved on the way down (see AUTOSAVE_S).

        :meth:`start` brings it back on the same port with the same data location.
        """
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def create_container(self, name: str) -> None:
        """Create a blob container (if it does not exist)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string)
        with contextlib.suppress(ResourceExistsError):
            client.create_container(name)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
