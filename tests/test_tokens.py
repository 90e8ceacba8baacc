"""The token lifecycle: list, revoke, rotate with a grace period, expiry, "last used", audit logs.

Through the CLI (real subprocesses on a data dir), through the admin endpoints
(TestClient), and against a live `lakehouse api` that must see CLI changes
without a restart and log every refusal with the token's name, never its secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from api import create_app
from api.tokens import (
    LAST_USED_RESOLUTION_S,
    TokenError,
    TokenStore,
    hash_token,
    info,
    parse_duration,
)
from config.settings import Settings
from tests.conftest import Tokens
from tests.helpers import (
    LAKEHOUSE,
    REPO,
    free_port,
    lakehouse_env,
    start_lakehouse,
    stop,
    wait_healthy,
    wait_until,
)

INGEST = "/v1/ingest/readings"
ROW = {"ts": "2026-11-20T10:00:00Z", "device_id": "d1", "sensor": "temp", "value": 1.5}


def cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAKEHOUSE, *args],
        cwd=REPO,
        env=lakehouse_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def create(data_dir: Path, name: str, *args: str) -> str:
    result = cli(data_dir, "tokens", "create", name, *args)
    assert result.returncode == 0, result.stderr
    (secret,) = result.stdout.splitlines()
    return secret


def listed(data_dir: Path) -> dict[str, dict[str, Any]]:
    result = cli(data_dir, "tokens", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {t["name"]: t for t in json.loads(result.stdout)["tokens"]}


def sleep_until(moment: datetime | None) -> None:
    assert moment is not None
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ingest(client: httpx.Client | TestClient, token: str) -> httpx.Response:
    return client.post(INGEST, json=[ROW], headers=bearer(token))


# --- the store -------------------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 43200
    assert parse_duration("15m") == 900
    assert parse_duration("90s") == parse_duration("90") == 90
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("0.5s") == 0.5
    for bad in ("", "1y", "-1h", "h", "1 h 2"):
        with pytest.raises(TokenError, match="invalid duration"):
            parse_duration(bad)


def test_files_written_before_the_lifecycle_fields_still_load(tmp_path: Path) -> None:
    path = tmp_path / "_meta" / "tokens.json"
    path.parent.mkdir()
    secret = "lh_" + "a" * 43
    old = {
        "tokens": [
            {
                "name": "legacy",
                "scopes": ["ingest:readings"],
                "sha256": hash_token(secret),
                "created_at": "2026-01-01T00:00:00Z",
            }
        ]
    }
    path.write_text(json.dumps(old))
    store = TokenStore(path)
    record = store.verify(secret)
    assert record is not None and record.name == "legacy"
    assert record.expires_at is None and record.revoked_at is None and record.retired == []
    assert record.status() == "active" and record.rate_rows_per_s is None
    # Later writes keep the legacy token working and add the new fields.
    store.create("new", ["query"])
    assert store.verify(secret) is not None
    assert "revoked_at" in path.read_text()
    listing = listed(tmp_path)
    assert listing["legacy"]["status"] == "active" and listing["legacy"]["last_used_at"] is None


def test_last_used_is_written_at_most_once_a_minute_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    worker_a, worker_b = TokenStore(path), TokenStore(path)  # two API processes' stores
    secret = worker_a.create("sensor", ["ingest:readings"])
    record = worker_a.verify(secret)
    assert record is not None and worker_a.touch_due(record)
    assert worker_a.touch("sensor")
    first = worker_a.get("sensor").last_used_at
    assert first is not None
    identity = os.stat(path).st_ino
    # The other process read the file before the touch: it still thinks a touch is due,
    # but under the lock it sees the fresh value and does not write.
    assert not worker_b.touch("sensor")
    assert os.stat(path).st_ino == identity
    # The first process does not even try again within the minute.
    fresh = worker_a.verify(secret)
    assert fresh is not None and not worker_a.touch_due(fresh)
    later = datetime.now(UTC) + timedelta(seconds=LAST_USED_RESOLUTION_S + 1)
    assert worker_a.touch_due(fresh.model_copy(update={"last_used_at": first}), later) is False
    # (the in-process memo holds too, so a stale copy of the record is not re-written)


def test_touch_never_waits_for_the_lock(tmp_path: Path) -> None:
    import fcntl

    store = TokenStore(tmp_path / "tokens.json")
    store.create("sensor", ["ingest:readings"])
    with open(tmp_path / "tokens.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # e.g. the CLI in the middle of a write
        started = time.monotonic()
        assert store.touch("sensor") is False
        assert time.monotonic() - started < 0.5
    record = store.get("sensor")
    assert store.touch_due(record)  # a skipped touch is retried on the next request
    assert store.touch("sensor")


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_list_revoke_rotate_expire(tmp_path: Path) -> None:
    data_dir = tmp_path
    sensor = create(data_dir, "sensor", "--scope", "ingest:readings", "--expires-in", "30d")
    ops = create(data_dir, "ops", "-s", "admin", "--rate-rows", "50", "--rate-bytes", "1000")
    store = TokenStore(data_dir / "_meta" / "tokens.json")

    tokens = listed(data_dir)
    assert set(tokens) == {"sensor", "ops"}
    assert tokens["sensor"]["scopes"] == ["ingest:readings"]
    assert tokens["sensor"]["status"] == "active" and tokens["sensor"]["last_used_at"] is None
    expires = datetime.fromisoformat(tokens["sensor"]["expires_at"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert tokens["ops"]["expires_at"] is None
    assert tokens["ops"]["rate_rows_per_s"] == 50 and tokens["ops"]["rate_bytes_per_s"] == 1000
    table = cli(data_dir, "tokens", "list")
    assert table.returncode == 0, table.stderr
    for column in ("name", "scopes", "status", "created_at", "last_used_at", "expires_at"):
        assert column in table.stdout
    assert "rows=50/s bytes=1000/s" in table.stdout
    for secret in (sensor, ops):
        assert secret not in table.stdout and hash_token(secret) not in table.stdout
        assert hash_token(secret) not in json.dumps(tokens)

    # rotate: a new secret on stdout, the old one works for the grace period only
    # (a CLI run takes over a second, hence 3 s rather than 1 s)
    rotated = cli(data_dir, "tokens", "rotate", "sensor", "--grace", "3s")
    assert rotated.returncode == 0, rotated.stderr
    (new_sensor,) = rotated.stdout.splitlines()
    assert new_sensor.startswith("lh_") and new_sensor != sensor
    assert "old secret works until" in rotated.stderr
    assert store.check(new_sensor).accepted and store.check(sensor).accepted
    grace_end = store.get("sensor").retired[-1].valid_until
    assert info(store.get("sensor")).previous_secret_valid_until == grace_end
    sleep_until(grace_end)
    verdict = store.check(sensor)
    assert verdict.refusal == "expired" and "replaced by rotation" in verdict.message
    assert store.check(new_sensor).accepted
    assert listed(data_dir)["sensor"]["previous_secret_valid_until"] is None

    # the default grace comes from the setting
    again = cli(data_dir, "tokens", "rotate", "sensor", LAKEHOUSE_TOKEN_ROTATION_GRACE_S="7200")
    assert again.returncode == 0, again.stderr
    until = datetime.fromisoformat(listed(data_dir)["sensor"]["previous_secret_valid_until"])
    assert timedelta(minutes=119) < until - datetime.now(UTC) <= timedelta(hours=2)
    newest = again.stdout.strip()

    # revoke: every secret of the token is refused as revoked; the name can be reused
    revoked = cli(data_dir, "tokens", "revoke", "sensor")
    assert revoked.returncode == 0, revoked.stderr
    assert listed(data_dir)["sensor"]["status"] == "revoked"
    for secret in (newest, new_sensor):
        assert store.check(secret).refusal == "revoked"
    assert cli(data_dir, "tokens", "rotate", "sensor").returncode == 2
    missing = cli(data_dir, "tokens", "revoke", "nobody")
    assert missing.returncode == 2 and "no token named 'nobody'" in missing.stderr
    reborn = create(data_dir, "sensor", "-s", "ingest:readings")
    assert store.check(reborn).accepted and listed(data_dir)["sensor"]["status"] == "active"
    duplicate = cli(data_dir, "tokens", "create", "sensor", "-s", "query")
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr

    # expiry
    short = create(data_dir, "short", "-s", "query", "--expires-in", "3s")
    assert store.check(short).accepted
    sleep_until(store.get("short").expires_at)
    assert store.check(short).refusal == "expired"
    assert listed(data_dir)["short"]["status"] == "expired"
    bad = cli(data_dir, "tokens", "create", "x", "-s", "query", "--expires-in", "soon")
    assert bad.returncode == 2 and "invalid duration" in bad.stderr


# --- the admin endpoints ---------------------------------------------------------------------


@pytest.fixture
def client(settings: Settings, tokens: Tokens) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_admin_endpoints(client: TestClient, tokens: Tokens) -> None:
    admin = bearer(tokens.admin)
    with capture_logs() as logs:
        for token in (tokens.query, tokens.ingest_all):
            for method, path in (
                ("GET", "/v1/admin/tokens"),
                ("POST", "/v1/admin/tokens"),
                ("POST", "/v1/admin/tokens/sensors/rotate"),
                ("DELETE", "/v1/admin/tokens/sensors"),
            ):
                refused = client.request(method, path, headers=bearer(token), json={})
                assert refused.status_code == 403, (method, path, refused.text)
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert len(failed) == 8
    assert {(e["reason"], e["token"], e["client"]) for e in failed} == {
        ("insufficient_scope", "analyst", "testclient"),
        ("insufficient_scope", "all-ingest", "testclient"),
    }

    created = client.post(
        "/v1/admin/tokens",
        headers=admin,
        json={"name": "edge", "scopes": ["ingest:readings"], "expires_in": "2h",
              "rate_rows_per_s": 10},
    )  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    secret = body["secret"]
    assert secret.startswith("lh_") and body["token"]["name"] == "edge"
    assert body["token"]["rate_rows_per_s"] == 10 and body["token"]["status"] == "active"
    assert ingest(client, secret).status_code == 202

    listing = client.get("/v1/admin/tokens", headers=admin)
    assert listing.status_code == 200
    views = {t["name"]: t for t in listing.json()["tokens"]}
    assert {"admin", "sensors", "all-ingest", "analyst", "other", "edge"} == set(views)
    edge = views["edge"]
    assert edge["last_used_at"] is not None  # the ingest above
    assert datetime.fromisoformat(edge["expires_at"]) > datetime.now(UTC) + timedelta(minutes=119)
    assert secret not in listing.text and hash_token(secret) not in listing.text
    assert "sha256" not in listing.text

    errors = [
        (client.post("/v1/admin/tokens", headers=admin, json={"name": "edge", "scopes": ["query"]}),
         409, "token_exists"),
        (client.post("/v1/admin/tokens", headers=admin, json={"name": "x", "scopes": ["nope"]}),
         400, "invalid_token_request"),
        (client.post("/v1/admin/tokens", headers=admin,
                     json={"name": "x", "scopes": ["query"], "expires_in": "soon"}),
         400, "invalid_token_request"),
        (client.post("/v1/admin/tokens/nobody/rotate", headers=admin), 404, "unknown_token"),
        (client.delete("/v1/admin/tokens/nobody", headers=admin), 404, "unknown_token"),
        (client.post("/v1/admin/tokens/edge/rotate?grace=later", headers=admin),
         400, "invalid_token_request"),
    ]  # fmt: skip
    for response, status, code in errors:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code

    rotated = client.post("/v1/admin/tokens/edge/rotate?grace=1s", headers=admin)
    assert rotated.status_code == 200, rotated.text
    assert rotated.headers["cache-control"] == "no-store"
    new_secret = rotated.json()["secret"]
    assert rotated.json()["token"]["previous_secret_valid_until"] is not None
    assert ingest(client, secret).status_code == 202  # within the grace period
    assert ingest(client, new_secret).status_code == 202
    time.sleep(1.2)
    old = ingest(client, secret)
    assert old.status_code == 401
    assert old.json()["error"]["reason"] == "expired"
    assert "replaced by rotation" in old.json()["error"]["message"]
    assert ingest(client, new_secret).status_code == 202

    revoked = client.delete("/v1/admin/tokens/edge", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["token"]["status"] == "revoked"
    refused = ingest(client, new_secret)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["reason"] == "revoked"
    assert "token 'edge' was revoked at" in refused.json()["error"]["message"]

    expiring = client.post(
        "/v1/admin/tokens",
        headers=admin,
        json={"name": "brief", "scopes": ["query"], "expires_in": "1s"},
    ).json()["secret"]
    assert client.get("/v1/sources", headers=bearer(expiring)).status_code == 200
    time.sleep(1.2)
    expired = client.get("/v1/sources", headers=bearer(expiring))
    assert expired.status_code == 401
    assert "token 'brief' expired at" in expired.json()["error"]["message"]


# --- a live server: CLI changes without restart, audit log lines ----------------------------


def test_live_api_sees_cli_changes_and_logs_every_refusal(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "api.log"
    proc = start_lakehouse(
        ["api", "--host", "127.0.0.1", "--port", str(port)],
        data_dir,
        log,
        LAKEHOUSE_LOG_LEVEL="INFO",
    )
    base = f"http://127.0.0.1:{port}"
    secrets: list[str] = list(vars(tokens).values())
    try:
        wait_healthy(base, proc, log)
        with httpx.Client(base_url=base, timeout=30) as client:
            # created by the CLI while the server runs: accepted at once
            fresh = create(data_dir, "late", "-s", "ingest:readings")
            brief = create(data_dir, "brief", "-s", "ingest:readings", "--expires-in", "4s")
            secrets += [fresh, brief]
            assert ingest(client, fresh).status_code == 202
            # revoked by the CLI: refused at once
            assert cli(data_dir, "tokens", "revoke", "late").returncode == 0
            revoked = ingest(client, fresh)
            assert revoked.status_code == 401
            assert "revoked" in revoked.json()["error"]["message"]
            sleep_until(TokenStore(data_dir / "_meta" / "tokens.json").get("brief").expires_at)
            expired = ingest(client, brief)
            assert expired.status_code == 401
            assert "expired" in expired.json()["error"]["message"]
            bogus = "lh_" + "Z" * 43
            secrets.append(bogus)
            assert ingest(client, bogus).status_code == 401
            assert client.post(INGEST, json=[ROW]).status_code == 401
            assert ingest(client, tokens.query).status_code == 403
            # "last used" reached the file, written by the server
            assert listed(data_dir)["admin"]["last_used_at"] is None
            assert client.get("/v1/sources", headers=bearer(tokens.admin)).status_code == 200
            wait_until(lambda: listed(data_dir)["admin"]["last_used_at"], timeout=10)

        def failures() -> list[dict[str, Any]]:
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
            return [e for e in map(json.loads, lines) if e.get("event") == "auth.failed"]

        events = wait_until(lambda: failures() if len(failures()) >= 5 else None, timeout=10)
    finally:
        stop(proc)
    seen = {(e["reason"], e["token"]) for e in events}
    assert seen == {
        ("revoked", "late"),
        ("expired", "brief"),
        ("invalid", "unknown"),
        ("missing", "unknown"),
        ("insufficient_scope", "analyst"),
    }, events
    for event in events:
        assert event["level"] == "warning"
        assert event["client"] == "127.0.0.1"
        assert event["path"] == INGEST
    text = log.read_text()
    for secret in secrets:
        assert secret not in text and hash_token(secret) not in text


def test_every_rewrite_of_the_token_file_is_durable_rename_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss right after `tokens revoke` must not bring the token back: the file
    is fsynced and so is its directory, after the rename."""
    import api.tokens as tokens_module

    synced: list[Path] = []
    monkeypatch.setattr(tokens_module, "fsync_directory", synced.append)
    store = TokenStore(tmp_path / "_meta" / "tokens.json")
    store.create("ci", ["ingest:readings"])
    store.revoke("ci")
    assert synced == [store.path.parent, store.path.parent]
    assert store.get("ci").revoked_at is not None
