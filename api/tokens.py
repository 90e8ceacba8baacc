"""Bearer tokens: created once, stored only as SHA-256 hashes, checked in constant time.

Tokens are 256-bit random secrets, so an unsalted fast hash is the right tool
(password hashing exists for low-entropy secrets). The store is a JSON file
under ``<data_dir>/_meta/``, replaced atomically and re-read when it changes,
so ``lakehouse tokens create`` takes effect in a running API.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from config.contracts import SOURCE_NAME_RE

TOKEN_PREFIX = "lh_"
SCOPE_RE = re.compile(r"^(admin|query|ingest:\*|ingest:" + SOURCE_NAME_RE.pattern[1:-1] + r")$")
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class TokenError(ValueError):
    """A token request is invalid (bad name, bad scope, duplicate name)."""


class TokenRecord(BaseModel):
    """What is stored about a token: never the secret, only its hash."""

    name: str
    scopes: list[str] = Field(min_length=1)
    sha256: str
    created_at: datetime

    @field_validator("scopes")
    @classmethod
    def _valid_scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            check_scope(scope)
        return scopes

    def allows(self, scope: str) -> bool:
        """Whether this token grants ``scope`` (``admin`` grants everything)."""
        if "admin" in self.scopes or scope in self.scopes:
            return True
        return scope.startswith("ingest:") and "ingest:*" in self.scopes


class _TokenFile(BaseModel):
    tokens: list[TokenRecord] = Field(default_factory=list)


def check_scope(scope: str) -> str:
    """Return ``scope`` if well-formed, else raise :class:`TokenError`."""
    if not SCOPE_RE.fullmatch(scope):
        raise TokenError(f"invalid scope {scope!r}: use admin, query, ingest:* or ingest:<source>")
    return scope


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """File-backed token registry shared by the CLI and the API."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cache: tuple[tuple[int, int, int], list[TokenRecord]] | None = None
        self._cache_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def records(self) -> list[TokenRecord]:
        """All tokens, re-read from disk when the file changed."""
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return []
        # os.replace gives every rewrite a new inode, so this identity changes with content.
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            if self._cache and self._cache[0] == identity:
                return self._cache[1]
            records = _TokenFile.model_validate_json(self._path.read_bytes()).tokens
            self._cache = (identity, records)
            return records

    def create(self, name: str, scopes: list[str]) -> str:
        """Register a new token and return its secret (shown once, never stored)."""
        if not TOKEN_NAME_RE.fullmatch(name):
            raise TokenError(
                f"invalid token name {name!r}: 1-64 letters, digits, '_', '.', '@' or '-'"
            )
        if not scopes:
            raise TokenError("a token needs at least one scope")
        for scope in scopes:
            check_scope(scope)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(
            name=name,
            scopes=sorted(set(scopes)),
            sha256=hash_token(secret),
            created_at=datetime.now(UTC),
        )
        with self._locked():
            current = self.records()
            if any(existing.name == name for existing in current):
                raise TokenError(f"a token named {name!r} already exists")
            self._write([*current, record])
        return secret

    def verify(self, presented: str) -> TokenRecord | None:
        """The token's record if ``presented`` is a known token, else ``None``.

        Every stored hash is compared, in constant time, so timing reveals nothing.
        """
        digest = hash_token(presented)
        found: TokenRecord | None = None
        for record in self.records():
            if hmac.compare_digest(record.sha256, digest):
                found = record
        return found

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self._path.with_suffix(".lock")
        with open(lock_path, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, records: list[TokenRecord]) -> None:
        payload = _TokenFile(tokens=records).model_dump_json(indent=2).encode("utf-8")
        temp = self._path.with_suffix(".tmp")
        with open(temp, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self._path)
        with self._cache_lock:
            self._cache = None


def describe(record: TokenRecord) -> dict[str, str]:
    """A printable summary of a token (no secret, no hash)."""
    return {
        "name": record.name,
        "scopes": " ".join(record.scopes),
        "created_at": record.created_at.isoformat(timespec="seconds"),
    }
