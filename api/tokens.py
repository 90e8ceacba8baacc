"""Bearer tokens: created once, stored only as SHA-256 hashes, checked in constant time.

Tokens are 256-bit random secrets, so an unsalted fast hash is the right tool
(password hashing exists for low-entropy secrets). The store is a JSON file
under ``<data_dir>/_meta/``, replaced atomically under a lock file and re-read
when its identity (inode, mtime, ctime, size) changes, so ``lakehouse tokens ...`` takes
effect in a running API (every worker process) without a restart, at the cost
of one ``stat`` per request.

Lifecycle: a token may carry an expiry; ``revoke`` keeps the record (marked
revoked, so its secret is refused as *revoked*, not *unknown*); ``rotate``
issues a new secret and keeps the old one's hash valid for a grace period.
"Last used" is written at most once a minute per token, by whichever process
first takes the lock without waiting, so requests never queue behind the file.
Files written before these fields existed load with their defaults.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from config.contracts import SOURCE_NAME_RE
from landing_zone.layout import fsync_directory

TOKEN_PREFIX = "lh_"
SCOPE_RE = re.compile(
    r"^(admin|query|metrics|ingest:\*|ingest:" + SOURCE_NAME_RE.pattern[1:-1] + r")$"
)
# What /metrics asks of a token when LAKEHOUSE_METRICS_AUTH is on (API and bridges).
METRICS_SCOPE = "metrics"
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
LAST_USED_RESOLUTION_S = 60.0  # "last used" is written at most this often per token
RETIRED_KEPT_FOR = timedelta(days=7)  # a rotated-out secret is reported as such this long

TokenStatus = Literal["active", "expired", "revoked"]
Refusal = Literal["invalid", "expired", "revoked"]


class TokenError(ValueError):
    """A token request is invalid (bad name, bad scope, bad duration)."""


class TokenExists(TokenError):
    """A live token already has this name."""


class TokenNotFound(TokenError):
    """No token has this name."""


class RetiredSecret(BaseModel):
    """The hash of a secret replaced by rotation, accepted until ``valid_until``."""

    sha256: str
    valid_until: datetime


class TokenRecord(BaseModel):
    """What is stored about a token: never the secret, only its hash."""

    name: str
    scopes: list[str] = Field(min_length=1)
    sha256: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None
    last_used_at: datetime | None = None
    retired: list[RetiredSecret] = Field(default_factory=list)
    rate_rows_per_s: float | None = Field(None, gt=0)
    rate_bytes_per_s: float | None = Field(None, gt=0)

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

    def status(self, now: datetime | None = None) -> TokenStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at:
            return "expired"
        return "active"


class _TokenFile(BaseModel):
    tokens: list[TokenRecord] = Field(default_factory=list)


class TokenInfo(BaseModel):
    """What ``tokens list`` and ``GET /v1/admin/tokens`` show: never a secret or hash."""

    name: str
    scopes: list[str]
    status: TokenStatus
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None
    previous_secret_valid_until: datetime | None = Field(
        description="After a rotation: the old secret works until then."
    )
    last_used_at: datetime | None = Field(description="Accurate to about a minute.")
    rate_rows_per_s: float | None = Field(description="Per-token override of the rows limit.")
    rate_bytes_per_s: float | None = Field(description="Per-token override of the bytes limit.")


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a presented secret."""

    record: TokenRecord | None  # whose secret it is (also when refused as expired/revoked)
    refusal: Refusal | None  # None: accepted
    message: str

    @property
    def accepted(self) -> bool:
        return self.refusal is None


def check_scope(scope: str) -> str:
    """Return ``scope`` if well-formed, else raise :class:`TokenError`."""
    if not SCOPE_RE.fullmatch(scope):
        raise TokenError(
            f"invalid scope {scope!r}: use admin, query, metrics, ingest:* or ingest:<source>"
        )
    return scope


def check_name(name: str) -> str:
    if not TOKEN_NAME_RE.fullmatch(name):
        raise TokenError(f"invalid token name {name!r}: 1-64 letters, digits, '_', '.', '@' or '-'")
    return name


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``15m``, ``90s``, ``2w`` or a bare number of seconds."""
    match = DURATION_RE.fullmatch(text)
    if not match:
        raise TokenError(
            f"invalid duration {text!r}: a number with an optional unit s, m, h, d or w "
            "(e.g. 30d, 12h, 90s)"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


class TokenStore:
    """File-backed token registry shared by the CLI and the API."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cache: tuple[tuple[int, int, int, int], list[TokenRecord]] | None = None
        self._cache_lock = threading.Lock()
        self._touch_attempts: dict[str, float] = {}  # name -> monotonic time of last attempt

    @property
    def path(self) -> Path:
        return self._path

    def records(self) -> list[TokenRecord]:
        """All tokens, re-read from disk when the file changed."""
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return []
        # os.replace gives every rewrite a new inode, so this identity changes with content
        # (ctime too: a freed inode number can come back within one mtime tick).
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        with self._cache_lock:
            if self._cache and self._cache[0] == identity:
                return self._cache[1]
            records = _TokenFile.model_validate_json(self._path.read_bytes()).tokens
            self._cache = (identity, records)
            return records

    def get(self, name: str) -> TokenRecord:
        for record in self.records():
            if record.name == name:
                return record
        raise TokenNotFound(f"no token named {name!r}")

    def create(
        self,
        name: str,
        scopes: list[str],
        *,
        expires_in_s: float | None = None,
        rate_rows_per_s: float | None = None,
        rate_bytes_per_s: float | None = None,
    ) -> str:
        """Register a new token and return its secret (shown once, never stored).

        The name of a revoked token may be reused (the revoked record is replaced).
        """
        check_name(name)
        if not scopes:
            raise TokenError("a token needs at least one scope")
        for scope in scopes:
            check_scope(scope)
        if expires_in_s is not None and expires_in_s <= 0:
            raise TokenError("the expiry must be in the future")
        for label, rate in (("rows", rate_rows_per_s), ("bytes", rate_bytes_per_s)):
            if rate is not None and rate <= 0:
                raise TokenError(f"the {label} rate limit must be positive")
        secret = _new_secret()
        now = datetime.now(UTC)
        record = TokenRecord(
            name=name,
            scopes=sorted(set(scopes)),
            sha256=hash_token(secret),
            created_at=now,
            expires_at=None if expires_in_s is None else now + timedelta(seconds=expires_in_s),
            rate_rows_per_s=rate_rows_per_s,
            rate_bytes_per_s=rate_bytes_per_s,
        )
        with self._locked():
            current = self.records()
            for existing in current:
                if existing.name == name and existing.revoked_at is None:
                    raise TokenExists(f"a token named {name!r} already exists")
            self._write([*(r for r in current if r.name != name), record])
        return secret

    def revoke(self, name: str) -> TokenRecord:
        """Mark ``name`` revoked (its current and rotated-out secrets stop working now)."""
        with self._locked():
            current = self.records()
            record = self._find(current, name)
            if record.revoked_at is not None:
                return record
            updated = record.model_copy(update={"revoked_at": datetime.now(UTC)})
            self._write([updated if r.name == name else r for r in current])
        return updated

    def rotate(self, name: str, grace_s: float) -> tuple[str, TokenRecord]:
        """A new secret for ``name``; the current one keeps working for ``grace_s`` seconds."""
        if grace_s < 0:
            raise TokenError("the grace period cannot be negative")
        secret = _new_secret()
        now = datetime.now(UTC)
        with self._locked():
            current = self.records()
            record = self._find(current, name)
            status = record.status(now)
            if status != "active":
                raise TokenError(f"token {name!r} is {status}; create a new one instead")
            retired = [r for r in record.retired if r.valid_until > now - RETIRED_KEPT_FOR] + [
                RetiredSecret(sha256=record.sha256, valid_until=now + timedelta(seconds=grace_s))
            ]
            updated = record.model_copy(
                update={"sha256": hash_token(secret), "rotated_at": now, "retired": retired}
            )
            self._write([updated if r.name == name else r for r in current])
        return secret, updated

    def check(self, presented: str, now: datetime | None = None) -> Verdict:
        """Whose secret ``presented`` is, and whether it is accepted now.

        Every stored hash (current and rotated-out) is compared in constant time,
        so timing reveals nothing about which one matched, if any.
        """
        now = now or datetime.now(UTC)
        digest = hash_token(presented)
        found: TokenRecord | None = None
        retired_until: datetime | None = None
        for record in self.records():
            if hmac.compare_digest(record.sha256, digest):
                found, retired_until = record, None
            for old in record.retired:
                if hmac.compare_digest(old.sha256, digest):
                    found, retired_until = record, old.valid_until
        if found is None:
            return Verdict(None, "invalid", "invalid or revoked token")
        if found.revoked_at is not None:
            return Verdict(
                found, "revoked", f"token {found.name!r} was revoked at {_iso(found.revoked_at)}"
            )
        if found.expires_at is not None and now >= found.expires_at:
            return Verdict(
                found, "expired", f"token {found.name!r} expired at {_iso(found.expires_at)}"
            )
        if retired_until is not None and now >= retired_until:
            return Verdict(
                found,
                "expired",
                f"this secret of token {found.name!r} was replaced by rotation; it stopped "
                f"working at {_iso(retired_until)}",
            )
        return Verdict(found, None, "ok")

    def verify(self, presented: str) -> TokenRecord | None:
        """The token's record if ``presented`` is accepted now, else ``None``."""
        verdict = self.check(presented)
        return verdict.record if verdict.accepted else None

    def touch_due(self, record: TokenRecord, now: datetime | None = None) -> bool:
        """Whether ``record``'s "last used" is stale enough to be written again."""
        now = now or datetime.now(UTC)
        if record.last_used_at is not None and (
            (now - record.last_used_at).total_seconds() < LAST_USED_RESOLUTION_S
        ):
            return False
        attempted = self._touch_attempts.get(record.name)
        return attempted is None or time.monotonic() - attempted >= LAST_USED_RESOLUTION_S

    def touch(self, name: str) -> bool:
        """Record that ``name`` was used now; ``False`` if skipped.

        Skipped when another writer holds the lock (never waits), or when another
        process already recorded a use within the last minute (checked under the lock).
        """
        self._touch_attempts[name] = time.monotonic()
        now = datetime.now(UTC)
        with self._locked(wait=False) as acquired:
            if not acquired:
                # Try again on the next request. pop: concurrent requests of the same
                # token may both get here, and a KeyError would fail a valid request.
                self._touch_attempts.pop(name, None)
                return False
            current = self.records()
            record = next((r for r in current if r.name == name), None)
            if record is None or (
                record.last_used_at is not None
                and (now - record.last_used_at).total_seconds() < LAST_USED_RESOLUTION_S
            ):
                return False
            updated = record.model_copy(update={"last_used_at": now})
            self._write([updated if r.name == name else r for r in current])
        return True

    @staticmethod
    def _find(records: list[TokenRecord], name: str) -> TokenRecord:
        for record in records:
            if record.name == name:
                return record
        raise TokenNotFound(f"no token named {name!r}")

    @contextmanager
    def _locked(self, wait: bool = True) -> Iterator[bool]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self._path.with_suffix(".lock")
        with open(lock_path, "a", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
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
        # The rename itself must survive a power loss: a revoked token must not come back.
        fsync_directory(self._path.parent)
        with self._cache_lock:
            self._cache = None


def info(record: TokenRecord, now: datetime | None = None) -> TokenInfo:
    """The public view of a token (no secret, no hash)."""
    now = now or datetime.now(UTC)
    grace = max((r.valid_until for r in record.retired), default=None)
    return TokenInfo(
        name=record.name,
        scopes=record.scopes,
        status=record.status(now),
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        rotated_at=record.rotated_at,
        previous_secret_valid_until=grace if grace is not None and grace > now else None,
        last_used_at=record.last_used_at,
        rate_rows_per_s=record.rate_rows_per_s,
        rate_bytes_per_s=record.rate_bytes_per_s,
    )


def describe(record: TokenRecord) -> dict[str, str]:
    """A printable summary of a token (no secret, no hash); "-" for unset times."""
    view = info(record)

    def when(moment: datetime | None) -> str:
        return "-" if moment is None else _iso(moment)

    return {
        "name": view.name,
        "scopes": " ".join(view.scopes),
        "status": view.status,
        "created_at": when(view.created_at),
        "last_used_at": when(view.last_used_at),
        "expires_at": when(view.expires_at),
        "previous_secret_valid_until": when(view.previous_secret_valid_until),
        "rate_limits": " ".join(
            f"{label}={rate:g}/s"
            for label, rate in (("rows", view.rate_rows_per_s), ("bytes", view.rate_bytes_per_s))
            if rate is not None
        )
        or "-",
    }
