"""Every error answer of the ingest and query endpoints, against the real `lakehouse api`.

Each rejected request must answer the common error shape ``{"error": {"code",
"message", ...}}`` and leave nothing visible in the landing zone; each accepted
one must land exactly one complete Parquet file.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from tests.conftest import LiveServer, Tokens

INGEST = "/v1/ingest/readings"
QUERY = "/v1/query"
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
CSV = {"Content-Type": "text/csv"}
PARQUET = {"Content-Type": "application/vnd.apache.parquet"}
LIMIT = 1024 * 1024  # LAKEHOUSE_MAX_BODY_BYTES of the live_api fixture


def reading(i: int) -> dict[str, Any]:
    return {
        "ts": f"2024-05-01T10:{i % 60:02d}:00Z",
        "device_id": f"dev-{i % 3}",
        "sensor": "temp",
        "value": 20.5 + i,
        "unit": "C",
    }


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def landing_dir(server: LiveServer) -> Path:
    return server.data_dir / "landing" / "readings"


def landed(server: LiveServer) -> list[Path]:
    """Visible (complete) landing files of readings, by name."""
    directory = landing_dir(server)
    return sorted(directory.glob("*.parquet")) if directory.is_dir() else []


def assert_nothing_visible(server: LiveServer) -> None:
    """No landing file of any kind, and no leftover temporary file."""
    directory = landing_dir(server)
    if directory.is_dir():
        visible = [p.name for p in directory.iterdir() if not p.name.startswith(".")]
        assert visible == [], f"rejected requests left landing files: {visible}"
    temp = directory / ".tmp"
    if temp.is_dir():
        assert list(temp.iterdir()) == [], "temporary files were left behind"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The common error shape with ``status`` and ``code``; returns the inner error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    return dict(error)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


# --- 401 -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [INGEST, QUERY])
def test_missing_or_invalid_credentials_get_401_with_a_bearer_challenge(
    live_api: LiveServer, tokens: Tokens, path: str
) -> None:
    body = {"sql": "SELECT 1"} if path == QUERY else reading(0)
    bogus = "lh_" + "x" * 43
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "missing bearer token"),
        ({"Authorization": f"Basic {tokens.admin}"}, "missing bearer token"),
        ({"Authorization": "Bearer"}, "missing bearer token"),
        ({"Authorization": f"Bearer {bogus}"}, "invalid or revoked token"),
        ({"Authorization": f"Bearer {tokens.admin}x"}, "invalid or revoked token"),
    ]
    with httpx.Client(base_url=live_api.base_url, timeout=30) as client:
        for headers, expected in cases:
            response = client.post(path, json=body, headers=headers)
            error = assert_error(response, 401, "unauthorized")
            assert expected in error["message"], (headers, error)
            assert response.headers["www-authenticate"] == "Bearer"
            # Neither the presented secret nor a stored hash is echoed back.
            assert tokens.admin not in response.text and bogus not in response.text
    assert_nothing_visible(live_api)


# --- 403 -------------------------------------------------------------------------------


def test_tokens_without_the_scope_get_403_naming_it(live_api: LiveServer, tokens: Tokens) -> None:
    cases = [
        (tokens.ingest_other, INGEST, "ingest:readings", "other"),
        (tokens.query, INGEST, "ingest:readings", "analyst"),
        # Scope is checked before existence: a narrow token learns nothing about other sources.
        (tokens.ingest_readings, "/v1/ingest/nonexistent", "ingest:nonexistent", "sensors"),
    ]
    for token, path, scope, name in cases:
        with live_api.client(token) as client:
            response = client.post(path, content=ndjson([reading(1)]), headers=NDJSON)
        error = assert_error(response, 403, "forbidden")
        assert error["scope"] == scope
        assert repr(scope) in error["message"] and repr(name) in error["message"]
        assert "www-authenticate" not in response.headers
    for token in (tokens.ingest_readings, tokens.ingest_all, tokens.ingest_other):
        with live_api.client(token) as client:
            response = client.post(QUERY, json={"sql": "SELECT 1"})
        error = assert_error(response, 403, "forbidden")
        assert error["scope"] == "query"
    assert_nothing_visible(live_api)
    assert not (live_api.data_dir / "landing" / "nonexistent").exists()


# --- 404 / 400 source names ----------------------------------------------------------------


def test_unknown_source_is_404_and_creates_no_directory(
    live_api: LiveServer, tokens: Tokens
) -> None:
    for token in (tokens.ingest_all, tokens.admin):
        with live_api.client(token) as client:
            response = client.post("/v1/ingest/weather", json=reading(0))
        error = assert_error(response, 404, "unknown_source")
        assert error["source"] == "weather"
        assert "'weather'" in error["message"]
    assert not (live_api.data_dir / "landing" / "weather").exists()
    assert_nothing_visible(live_api)


INVALID_SOURCE_PATHS = [
    "Bad..Name",
    "a%2F..%2Fb",
    "..%2F..%2Fescaped",
    "readings%2F..%2F..%2Fescaped",
    "%2E%2E",
    "%2E%2E%2F%2E%2E%2Fescaped",
    "readings%00",
    "readings%2F",
    "readings%5C..%5Cescaped",
    "READINGS",
    "1readings",
    "_readings",
    "r" * 64,
]


def test_invalid_source_names_are_400_and_never_touch_the_filesystem(
    live_api: LiveServer, tokens: Tokens
) -> None:
    root = live_api.data_dir.parent
    before = tree(root)
    with live_api.client(tokens.admin) as client:  # admin passes every scope check
        for raw in INVALID_SOURCE_PATHS:
            response = client.post(f"/v1/ingest/{raw}", json=reading(0))
            # The encoded form reached the server unchanged (httpx did not normalise it).
            assert response.request.url.raw_path == f"/v1/ingest/{raw}".encode(), raw
            error = assert_error(response, 400, "invalid_source_name")
            assert "lowercase" in error["message"], raw
    assert tree(root) == before
    assert not (root / "escaped").exists()
    assert not (live_api.data_dir / "escaped").exists()
    assert_nothing_visible(live_api)


# --- 400 malformed bodies -------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, dict[str, str], str, dict[str, int]]] = [
    (
        "ndjson-bad-line-3",
        ndjson([reading(1), reading(2)]) + b'{"ts": "2024-05-01T10:00:00Z", "value": \n',
        NDJSON,
        "line 3",
        {"line": 3},
    ),
    (
        "ndjson-array-line",
        ndjson([reading(1)]) + b"[1, 2]\n",
        NDJSON,
        "line 2: expected a JSON object, got list",
        {"line": 2},
    ),
    (
        "json-array-non-object",
        json.dumps([reading(1), reading(2), 42, reading(3)]).encode(),
        JSON,
        "record 3: expected a JSON object, got int",
        {"record": 3},
    ),
    (
        "json-array-null-element",
        json.dumps([reading(1), None]).encode(),
        JSON,
        "record 2: expected a JSON object, got null",
        {"record": 2},
    ),
    ("json-scalar", b"42", JSON, "expected a JSON object or an array of JSON objects", {}),
    (
        "json-truncated",
        b'[{"device_id": "d"},\n {"device_id": ',
        JSON,
        "line 2: invalid JSON",
        {"line": 2},
    ),
    (
        "ndjson-invalid-utf8",
        ndjson([reading(1)]) + b'{"device_id": "\xff\xfe"}\n',
        NDJSON,
        "line 2: invalid UTF-8",
        {"line": 2},
    ),
    ("json-invalid-utf8", b'[{"device_id": "caf\xe9"}]', JSON, "invalid UTF-8", {}),
    (
        "ndjson-nan",
        ndjson([reading(1)]) + b'{"device_id": "d", "value": NaN}\n',
        NDJSON,
        "line 2: invalid JSON: NaN is not valid JSON",
        {"line": 2},
    ),
    (
        "json-infinity",
        b'[{"device_id": "d", "value": -Infinity}]',
        JSON,
        "-Infinity is not valid JSON",
        {},
    ),
    (
        "csv-short-row",
        b"ts,device_id,sensor,value\n2024-05-01T10:00:00Z,d,temp,1.5\n2024-05-01T10:01:00Z,d\n",
        CSV,
        "line 3",
        {"line": 3},
    ),
    (
        "csv-long-row",
        b"ts,device_id,sensor,value\n2024-05-01T10:00:00Z,d,temp,1.5\n"
        b"2024-05-01T10:01:00Z,d,temp,1.5\n2024-05-01T10:02:00Z,d,temp,1.5,extra\n",
        CSV,
        "line 4",
        {"line": 4},
    ),
    ("parquet-garbage", b"PAR1" + b"\x00garbage" * 20 + b"PAR1", PARQUET, "invalid Parquet", {}),
    ("parquet-not-parquet", ndjson([reading(1)]), PARQUET, "invalid Parquet", {}),
]


@pytest.mark.parametrize(
    ("body", "headers", "fragment", "where"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_bodies_are_400_naming_where(
    live_api: LiveServer,
    tokens: Tokens,
    body: bytes,
    headers: dict[str, str],
    fragment: str,
    where: dict[str, int],
) -> None:
    with live_api.client(tokens.ingest_readings) as client:
        response = client.post(INGEST, content=body, headers=headers)
    error = assert_error(response, 400, "malformed_body")
    assert fragment in error["message"]
    # Exactly the located position is reported, and nothing else.
    assert {k: error[k] for k in ("line", "record") if k in error} == where
    assert_nothing_visible(live_api)


def test_bad_gzip_and_empty_batches_are_400(live_api: LiveServer, tokens: Tokens) -> None:
    compressed = gzip.compress(ndjson([reading(i) for i in range(50)]))
    gz_ndjson = {**NDJSON, "Content-Encoding": "gzip"}
    with live_api.client(tokens.ingest_readings) as client:
        truncated = client.post(
            INGEST, content=compressed[: len(compressed) // 2], headers=gz_ndjson
        )
        assert "truncated gzip" in assert_error(truncated, 400, "malformed_body")["message"]
        not_gzip = client.post(INGEST, content=ndjson([reading(1)]), headers=gz_ndjson)
        assert "invalid gzip" in assert_error(not_gzip, 400, "malformed_body")["message"]

        empty_cases = [
            (b"[]", JSON),
            (b"ts,device_id,sensor,value\n", CSV),
            (
                parquet_bytes(pl.DataFrame({"device_id": []}, schema={"device_id": pl.String})),
                PARQUET,
            ),
        ]
        for body, headers in empty_cases:
            response = client.post(INGEST, content=body, headers=headers)
            error = assert_error(response, 400, "empty_batch")
            assert error["message"] == "the body holds no records", body
        for body, headers in [(b"", JSON), (b"  \n\n ", NDJSON), (b"\n", CSV)]:
            response = client.post(INGEST, content=body, headers=headers)
            assert "empty body" in assert_error(response, 400, "malformed_body")["message"]
    assert_nothing_visible(live_api)


# --- 413 / 415 ------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413(live_api: LiveServer, tokens: Tokens) -> None:
    line = json.dumps(reading(7)).encode() + b"\n"
    oversized = line * (LIMIT // len(line) + 1)
    assert LIMIT < len(oversized) < LIMIT + len(line) + 1
    bomb = gzip.compress(line * (2 * LIMIT // len(line)), compresslevel=9)
    assert len(bomb) < 64 * 1024  # small on the wire, over 1 MiB once inflated

    def chunked() -> Iterator[bytes]:  # no Content-Length: the streaming check must catch it
        for start in range(0, len(oversized), 64 * 1024):
            yield oversized[start : start + 64 * 1024]

    with live_api.client(tokens.ingest_readings) as client:
        declared = client.post(INGEST, content=oversized, headers=NDJSON)
        error = assert_error(declared, 413, "body_too_large")
        assert str(LIMIT) in error["message"]

        streamed = client.post(INGEST, content=chunked(), headers=NDJSON)
        assert "content-length" not in streamed.request.headers
        assert str(LIMIT) in assert_error(streamed, 413, "body_too_large")["message"]

        inflated = client.post(INGEST, content=bomb, headers={**NDJSON, "Content-Encoding": "gzip"})
        error = assert_error(inflated, 413, "body_too_large")
        assert "gzip" in error["message"] and str(LIMIT) in error["message"]

        # The same record count just under the limit is accepted: the limit is the boundary.
        fits = line * (LIMIT // len(line))
        accepted = client.post(INGEST, content=fits, headers=NDJSON)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["records"] == LIMIT // len(line)
    assert len(landed(live_api)) == 1


def test_unsupported_media_type_and_encoding_are_415(live_api: LiveServer, tokens: Tokens) -> None:
    body = ndjson([reading(1)])
    with live_api.client(tokens.ingest_readings) as client:
        for content_type in ("text/plain", "application/xml", "multipart/form-data"):
            response = client.post(INGEST, content=body, headers={"Content-Type": content_type})
            error = assert_error(response, 415, "unsupported_media_type")
            assert repr(content_type) in error["message"]
            assert "application/x-ndjson" in error["message"]  # lists what is accepted
        no_type = client.post(INGEST, content=body)
        assert "<none>" in assert_error(no_type, 415, "unsupported_media_type")["message"]

        for encoding in ("br", "deflate", "zstd"):
            response = client.post(
                INGEST, content=body, headers={**NDJSON, "Content-Encoding": encoding}
            )
            error = assert_error(response, 415, "unsupported_encoding")
            assert repr(encoding) in error["message"] and "gzip" in error["message"]
    assert_nothing_visible(live_api)


# --- 202 ------------------------------------------------------------------------------------


def accepted_cases() -> list[tuple[str, bytes, dict[str, str], int]]:
    records = [reading(i) for i in range(5)]
    csv_body = b"ts,device_id,sensor,value,unit\n" + b"".join(
        f"{r['ts']},{r['device_id']},{r['sensor']},{r['value']},{r['unit']}\n".encode()
        for r in records
    )
    typed = pl.DataFrame(records).with_columns(
        pl.col("ts").str.to_datetime(time_zone="UTC"), pl.col("value").cast(pl.Float64)
    )
    return [
        ("json-object", json.dumps(records[0]).encode(), JSON, 1),
        ("json-array", json.dumps(records).encode(), JSON, 5),
        (
            "json-charset",
            json.dumps(records[:2]).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
            2,
        ),
        ("ndjson", ndjson(records[:3]), NDJSON, 3),
        ("ndjson-crlf-blank-lines", ndjson(records[:2]).replace(b"\n", b"\r\n\r\n"), NDJSON, 2),
        ("csv", csv_body, CSV, 5),
        ("parquet", parquet_bytes(typed), PARQUET, 5),
        ("gzip-ndjson", gzip.compress(ndjson(records)), {**NDJSON, "Content-Encoding": "gzip"}, 5),
    ]


def test_each_accepted_format_lands_exactly_one_complete_file(
    live_api: LiveServer, tokens: Tokens
) -> None:
    with live_api.client(tokens.ingest_readings) as client:
        for name, body, headers, count in accepted_cases():
            before = set(landed(live_api))
            response = client.post(INGEST, content=body, headers=headers)
            assert response.status_code == 202, (name, response.text)
            answer = response.json()
            assert answer["source"] == "readings" and answer["records"] == count, name
            new = set(landed(live_api)) - before
            assert [p.name for p in new] == [f"{answer['batch_id']}.parquet"], name
            frame = pl.read_parquet(new.pop())
            assert frame.height == count, name
            assert set(frame.schema.values()) == {pl.String}, (name, frame.schema)
            assert frame["device_id"].to_list() == [f"dev-{i % 3}" for i in range(count)], name
            assert frame["value"].cast(pl.Float64).to_list() == [20.5 + i for i in range(count)], (
                name
            )
            if name == "parquet":  # typed input comes out in the raw ISO spelling
                assert frame["ts"][0] == "2024-05-01T10:00:00+00:00"
    assert len(landed(live_api)) == len(accepted_cases())
    temp = landing_dir(live_api) / ".tmp"
    assert not temp.exists() or list(temp.iterdir()) == []


def test_records_without_fields_are_accepted_and_kept(live_api: LiveServer, tokens: Tokens) -> None:
    """``{}`` is a record (bronze keeps it, silver's contract quarantines it), as it is
    from the Kafka bridge; only a body without any record is an empty batch."""
    cases = [(b"{}", JSON, 1), (b"{}\n{}", NDJSON, 2), (b'[{}, {"device_id": "d"}, {}]', JSON, 3)]
    with live_api.client(tokens.ingest_readings) as client:
        for body, headers, count in cases:
            response = client.post(INGEST, content=body, headers=headers)
            assert response.status_code == 202, (body, response.text)
            answer = response.json()
            assert answer["records"] == count, body
            frame = pl.read_parquet(landing_dir(live_api) / f"{answer['batch_id']}.parquet")
            assert frame.height == count, body


def test_landing_files_match_accepted_requests_one_to_one(
    live_api: LiveServer, tokens: Tokens
) -> None:
    """Interleave good and bad requests: only 202s leave files, one each, all complete."""
    good = ndjson([reading(1), reading(2)])
    bad_requests: list[tuple[str | None, str, bytes, dict[str, str]]] = [
        (None, INGEST, good, NDJSON),
        (tokens.query, INGEST, good, NDJSON),
        (tokens.ingest_readings, "/v1/ingest/Bad..Name", good, NDJSON),
        (tokens.ingest_readings, INGEST, good + b"{oops\n", NDJSON),
        (tokens.ingest_readings, INGEST, b"[]", JSON),
        (tokens.ingest_readings, INGEST, good, {"Content-Type": "text/plain"}),
        (tokens.ingest_readings, INGEST, good, {**NDJSON, "Content-Encoding": "br"}),
        (tokens.ingest_readings, INGEST, b"a,b\n1,2\n3\n", CSV),
        (tokens.ingest_readings, INGEST, b"x" * (LIMIT + 1), NDJSON),
    ]
    accepted: list[str] = []
    for token, path, body, headers in bad_requests:
        with live_api.client(token) as client:
            rejected = client.post(path, content=body, headers=headers)
            assert rejected.status_code >= 400, (path, headers, rejected.text)
            assert "error" in rejected.json()
            ok = client.post(INGEST, content=good, headers=NDJSON) if token else None
        if ok is not None and ok.status_code == 202:
            accepted.append(f"{ok.json()['batch_id']}.parquet")
    assert len(accepted) == 7  # the 401 and 403 clients cannot ingest at all
    assert len(accepted) < len(bad_requests)
    assert [p.name for p in landed(live_api)] == sorted(accepted)
    for path in landed(live_api):
        assert pl.read_parquet(path).height == 2
    visible = [p.name for p in landing_dir(live_api).iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == sorted(accepted)
    assert list((landing_dir(live_api) / ".tmp").iterdir()) == []


# --- query ----------------------------------------------------------------------------------


def test_query_accepts_only_a_single_select(
    live_api: LiveServer, tokens: Tokens, tmp_path: Path
) -> None:
    target = tmp_path / "exported.csv"
    cases = [
        (f"ATTACH '{tmp_path / 'other.duckdb'}' AS other", "only SELECT"),
        (f"COPY (SELECT 42 AS answer) TO '{target}'", "only SELECT"),
        ("SET threads = 1", "only SELECT"),
        ("CREATE TABLE t AS SELECT 1 AS x", "only SELECT"),
        ("INSTALL httpfs", "only SELECT"),
        ("LOAD httpfs", "only SELECT"),
        ("SELECT 1; SELECT 2", "exactly one statement, got 2"),
        ("SELECT 1; DROP TABLE x", "exactly one statement, got 2"),
    ]
    with live_api.client(tokens.query) as client:
        for sql, fragment in cases:
            response = client.post(QUERY, json={"sql": sql})
            error = assert_error(response, 400, "query_error")
            assert fragment in error["message"], (sql, error)
        # The sandbox answers real SELECTs (the rejections above are not blanket failures).
        ok = client.post(QUERY, json={"sql": "SELECT 41 + 1 AS answer"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["rows"] == [{"answer": 42}] and ok.json()["row_count"] == 1
    assert not target.exists()
    assert not (tmp_path / "other.duckdb").exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv_auto('/etc/passwd', header = false)",
        "SELECT * FROM glob('/etc/*')",
    ],
)
def test_query_cannot_read_files_outside_the_tables(
    live_api: LiveServer, tokens: Tokens, sql: str
) -> None:
    with live_api.client(tokens.query) as client:
        response = client.post(QUERY, json={"sql": sql})
    assert_error(response, 400, "query_error")
    assert "root:" not in response.text


def test_query_sql_errors_are_400_and_schema_errors_422(
    live_api: LiveServer, tokens: Tokens
) -> None:
    with live_api.client(tokens.query) as client:
        syntax = client.post(QUERY, json={"sql": "SELEC 1 FROM"})
        assert "syntax" in assert_error(syntax, 400, "query_error")["message"].lower()
        unknown = client.post(QUERY, json={"sql": "SELECT * FROM gold.no_such_table"})
        assert "no_such_table" in assert_error(unknown, 400, "query_error")["message"]

        missing = client.post(QUERY, json={"max_rows": 5})
        error = assert_error(missing, 422, "invalid_request")
        assert {"field": "body.sql", "message": "Field required"} in error["problems"]
        for body in ({"sql": ""}, {"sql": "SELECT 1", "max_rows": 0}, {"sql": 7}):
            response = client.post(QUERY, json=body)
            problems = assert_error(response, 422, "invalid_request")["problems"]
            assert problems and all(p["field"].startswith("body") for p in problems), body
        not_json = client.post(QUERY, content=b"{", headers=JSON)
        assert_error(not_json, 422, "invalid_request")


# --- probes and docs ------------------------------------------------------------------------


def test_health_ready_docs_and_openapi(live_api: LiveServer) -> None:
    with httpx.Client(base_url=live_api.base_url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "sources": ["readings"]}
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        spec = client.get("/openapi.json")
        assert spec.status_code == 200
        paths = spec.json()["paths"]
        assert "/v1/ingest/{source}" in paths and "/v1/query" in paths
        ingest = paths["/v1/ingest/{source}"]["post"]
        assert {"400", "401", "403", "404", "413", "415"} <= set(ingest["responses"])
        assert "application/x-ndjson" in ingest["requestBody"]["content"]
        missing = client.get("/no/such/route")
        assert_error(missing, 404, "http_404")
    # The readiness probe cleans up after itself.
    assert [p.name for p in (live_api.data_dir / "landing").iterdir()] == []


def test_oversized_bodies_are_refused_before_authentication(live_api: LiveServer) -> None:
    """Without a token, a large body must not be buffered: 413 (or 401) comes first."""
    with live_api.client() as client:
        response = client.post(
            "/v1/query",
            content=b'{"sql": "' + b"x" * (2 * 1024 * 1024) + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"

        def chunks():
            for _ in range(40):
                yield b"y" * 65536

        streamed = client.post(
            "/v1/query", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413


def test_sources_and_quality_endpoints(live_api: LiveServer, tokens: Tokens) -> None:
    from config.settings import load_settings
    from delta_processing.processor import Processor

    with live_api.client(tokens.ingest_readings) as ingest:
        body = b'{"ts":"2026-11-20T10:00:00Z","device_id":"d","sensor":"s","value":1}\n{"ts":"x"}'
        sent = ingest.post(
            "/v1/ingest/readings", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        assert sent.status_code == 202
        assert ingest.get("/v1/sources").status_code == 403
    from config.contracts import load_contracts

    Processor(load_settings(data_dir=live_api.data_dir), load_contracts()).run_once()
    with live_api.client(tokens.query) as client:
        sources = client.get("/v1/sources").json()
        assert [s["name"] for s in sources] == ["readings"]
        assert sources[0]["keys"] == ["device_id", "sensor", "ts"]
        assert client.get("/v1/sources/readings").json()["event_time"] == "ts"
        assert client.get("/v1/sources/nope").json()["error"]["code"] == "unknown_source"
        rows = client.get("/v1/quality", params={"source": "readings"}).json()
        assert len(rows) == 1
        assert (rows[0]["rows_in"], rows[0]["rows_passed"], rows[0]["rows_quarantined"]) == (
            2,
            1,
            1,
        )
        assert client.get("/v1/quality", params={"last": 0}).status_code == 422
