"""A corpus of bad input, each kind POSTed to the API and answered with a clear error.

Every refusal has the common error shape, the expected status and code, and a message
naming the problem (and the line or record where one exists); nothing refused leaves a
landing file. A few kinds are accepted *by design*, each with a documented outcome:
a UTF-8 byte order mark is skipped; a repeated key keeps its first value; numbers too
large for the contract's type, and columns mixing JSON types, reach quarantine with a
reason naming the field (bronze keeps every record raw, silver types it).
"""

# ruff: noqa: E501 - the corpus reads best as one line per kind

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.tokens import TokenStore
from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.processor import Processor

LIMIT = 1024 * 1024
GOOD = b'{"ts":"2026-11-01T00:00:00Z","device_id":"d","sensor":"s","value":1}'
JSON, NDJSON, CSV = "application/json", "application/x-ndjson", "text/csv"
PARQUET = "application/vnd.apache.parquet"
GZIP = {"Content-Encoding": "gzip"}


@dataclass(frozen=True)
class Bad:
    body: bytes
    content_type: str
    status: int
    code: str
    says: str  # a fragment of the message
    source: str = "readings"
    headers: tuple[tuple[str, str], ...] = ()
    where: dict[str, int] | None = None  # "line"/"record" the error must name


def _parquet_with_nested_binary() -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame({"v": [[b"\x00\x01"]]}).write_parquet(buffer)
    return buffer.getvalue()


INGEST_CORPUS: dict[str, Bad] = {
    # encodings
    "invalid_utf8_json": Bad(b'{"ts":"\xff\xfe"}', JSON, 400, "malformed_body", "invalid UTF-8 at byte 7"),
    "invalid_utf8_ndjson": Bad(GOOD + b'\n{"a":"\xc3\x28"}\n', NDJSON, 400, "malformed_body",
                               "invalid UTF-8", where={"line": 2}),
    "invalid_utf8_csv": Bad(b"ts,device_id\n\xff,d\n", CSV, 400, "malformed_body", "invalid UTF-8",
                            where={"line": 2}),
    "utf16_json": Bad(GOOD.decode().encode("utf-16"), JSON, 400, "malformed_body", "invalid UTF-8 at byte 0"),
    "lone_surrogate_escape": Bad(b'{"v":"\\ud800"}', JSON, 400, "malformed_body", "lone UTF-16 surrogate"),
    "lone_surrogate_in_mixed_array": Bad(b'[{"v":"\\udc00"},{"v":[1,{"a":1}]}]', JSON, 400,
                                         "malformed_body", "lone UTF-16 surrogate"),
    "raw_nul_in_key": Bad(b'{"a\x00b":1}', JSON, 400, "malformed_body", "Invalid control character"),
    "control_char_in_string": Bad(b'{"a":"x\x01y"}', NDJSON, 400, "malformed_body",
                                  "Invalid control character", where={"line": 1}),
    # JSON structure
    "deeply_nested_100k": Bad(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400,
                              "malformed_body", "recursion"),
    "deeply_nested_ndjson": Bad(GOOD + b'\n{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                                NDJSON, 400, "malformed_body", "recursion", where={"line": 2}),
    "nan_literal": Bad(b'{"value":NaN}', JSON, 400, "malformed_body", "NaN is not valid JSON"),
    "infinity_literal": Bad(b'{"value":-Infinity}\n', NDJSON, 400, "malformed_body",
                            "-Infinity is not valid JSON", where={"line": 1}),
    "integer_of_5000_digits": Bad(b'{"value":1' + b"0" * 5000 + b"}", JSON, 400, "malformed_body",
                                  "digits"),
    "json_scalar": Bad(b"42", JSON, 400, "malformed_body", "expected a JSON object or an array"),
    "json_string": Bad(b'"text"', JSON, 400, "malformed_body", "expected a JSON object or an array"),
    "array_of_scalars": Bad(b"[1,2,3]", JSON, 400, "malformed_body", "expected a JSON object, got int",
                            where={"record": 1}),
    "array_with_null_record": Bad(b'[{"a":1},null]', JSON, 400, "malformed_body",
                                  "expected a JSON object, got null", where={"record": 2}),
    "ndjson_line_is_array": Bad(GOOD + b"\n[1]\n", NDJSON, 400, "malformed_body",
                                "expected a JSON object, got list", where={"line": 2}),
    "trailing_garbage": Bad(GOOD + b" x", JSON, 400, "malformed_body", "Extra data"),
    "truncated_json": Bad(GOOD[:-5], JSON, 400, "malformed_body", "invalid JSON"),
    "empty_body": Bad(b"", JSON, 400, "malformed_body", "empty body"),
    "whitespace_only": Bad(b"  \n\t \r\n", NDJSON, 400, "malformed_body", "empty body"),
    "bom_only": Bad(b"\xef\xbb\xbf", NDJSON, 400, "malformed_body", "empty body"),
    "empty_array": Bad(b"[]", JSON, 400, "empty_batch", "no records"),
    # CSV
    "csv_ragged_row": Bad(b"a,b\n1,2\n3\n", CSV, 400, "malformed_body",
                          "expected 2 fields as in the header, found 1", where={"line": 3}),
    "csv_long_row": Bad(b"a,b\n1,2,3\n", CSV, 400, "malformed_body", "invalid CSV"),
    "csv_only_header": Bad(b"a,b\n", CSV, 400, "empty_batch", "no records"),
    "csv_unterminated_quote": Bad(b'a,b\n"1,2\n', CSV, 400, "malformed_body", "invalid CSV"),
    # compression
    "gzip_bomb": Bad(gzip.compress(b" " * (20 * LIMIT), compresslevel=9), JSON, 413,
                     "body_too_large", "inflates past the limit", headers=tuple(GZIP.items())),
    "truncated_gzip": Bad(gzip.compress(GOOD)[:-8], JSON, 400, "malformed_body", "truncated gzip",
                          headers=tuple(GZIP.items())),
    "gzip_header_plain_body": Bad(GOOD, JSON, 400, "malformed_body", "invalid gzip data",
                                  headers=tuple(GZIP.items())),
    "brotli_encoding": Bad(GOOD, JSON, 415, "unsupported_encoding", "use gzip",
                           headers=(("Content-Encoding", "br"),)),
    # content types and Parquet
    "text_plain": Bad(GOOD, "text/plain", 415, "unsupported_media_type", "'text/plain'"),
    "no_content_type": Bad(GOOD, "", 415, "unsupported_media_type", "'<none>'"),
    "xml": Bad(b"<a/>", "application/xml", 415, "unsupported_media_type", "accepted:"),
    "parquet_garbage": Bad(b"PAR1garbagePAR1", PARQUET, 400, "malformed_body", "invalid Parquet"),
    "json_sent_as_parquet": Bad(GOOD, PARQUET, 400, "malformed_body", "invalid Parquet"),
    "parquet_nested_binary": Bad(_parquet_with_nested_binary(), PARQUET, 400, "malformed_body",
                                 "binary values inside"),
    # size
    "oversize_body": Bad(b"[" + b" " * (LIMIT + 10) + b"]", JSON, 413, "body_too_large",
                         "exceeds the limit"),
    # source names: path tricks and invalid names
    "source_dotdot_encoded": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="%2e%2e"),
    "source_encoded_slash": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="a%2Fb"),
    "source_slash": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="a/b"),
    "source_traversal": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase",
                            source="readings/%2e%2e/%2e%2e/etc"),
    "source_uppercase": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="Readings"),
    "source_64_chars": Bad(GOOD, JSON, 400, "invalid_source_name", "1-63", source="r" * 64),
    "source_unicode": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="caf%C3%A9"),
    "source_nul": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source="read%00ings"),
    "source_hidden": Bad(GOOD, JSON, 400, "invalid_source_name", "lowercase", source=".inflight"),
    "source_leading_digit": Bad(GOOD, JSON, 400, "invalid_source_name", "starting with a letter",
                                source="1readings"),
    "source_unknown": Bad(GOOD, JSON, 404, "unknown_source", "unknown source 'nosuch'", source="nosuch"),
}  # fmt: skip

QUERY_CORPUS: dict[str, tuple[str, str]] = {
    "read_csv_passwd": ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    "read_text_passwd": ("SELECT * FROM read_text('/etc/passwd')", "file system operations are disabled"),
    "read_parquet_glob": ("SELECT * FROM read_parquet('/etc/*')", "file system operations are disabled"),
    "glob_root": ("SELECT * FROM glob('/*')", "file system operations are disabled"),
    "replacement_scan": ("SELECT * FROM '/etc/passwd'", "does not exist"),
    "sqlite_scan": ("SELECT * FROM sqlite_scan('/etc/passwd', 'x')", "sqlite_scan"),
    "getenv": ("SELECT getenv('HOME')", "getenv does not exist"),
    "copy_to": ("COPY (SELECT 1) TO '/tmp/x.csv'", "only SELECT queries are allowed, not COPY"),
    "attach": ("ATTACH '/tmp/x.db' AS x", "only SELECT queries are allowed, not ATTACH"),
    "detach": ("DETACH x", "only SELECT queries are allowed, not DETACH"),
    "install": ("INSTALL httpfs", "only SELECT queries are allowed"),
    "load": ("LOAD httpfs", "only SELECT queries are allowed"),
    "set": ("SET enable_external_access = true", "only SELECT queries are allowed, not SET"),
    "pragma": ("PRAGMA database_list", "only SELECT queries are allowed, not PRAGMA"),
    "call": ("CALL pragma_version()", "only SELECT queries are allowed, not CALL"),
    "export": ("EXPORT DATABASE '/tmp/x'", "only SELECT queries are allowed, not EXPORT"),
    "create": ("CREATE TABLE t AS SELECT 1", "only SELECT queries are allowed, not CREATE"),
    "two_statements": ("SELECT 1; SELECT 2", "expected exactly one statement, got 2"),
    "smuggled_copy": ("SELECT 1; COPY (SELECT 1) TO '/tmp/y.csv'", "expected exactly one statement"),
    "no_statement": ("   ", "expected exactly one statement, got 0"),
    "syntax_error": ("SELECT", "syntax error"),
}  # fmt: skip


@dataclass
class Api:
    client: TestClient
    settings: Settings
    headers: dict[str, str]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("corpus") / "dados"
    settings = load_settings(
        data_dir=data_dir, max_body_bytes=LIMIT, trigger_latency_ms=0, file_settle_ms=0
    )
    token = TokenStore(settings.tokens_file).create("corpus", ["admin"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, settings, {"Authorization": f"Bearer {token}"})


def _landing_files(data_dir: Path) -> list[Path]:
    landing = data_dir / "landing"
    return [p for p in landing.rglob("*") if p.is_file()] if landing.exists() else []


def _assert_error(response: object, status: int, code: str, says: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert error["code"] == code, error
    assert says in error["message"], error
    return dict(error)


def test_the_corpus_has_at_least_thirty_kinds() -> None:
    assert len(INGEST_CORPUS) + len(QUERY_CORPUS) >= 30
    assert len(INGEST_CORPUS) >= 30


@pytest.mark.reliability
@pytest.mark.parametrize("kind", list(INGEST_CORPUS))
def test_bad_ingest_input_gets_a_clear_error_and_lands_nothing(api: Api, kind: str) -> None:
    bad = INGEST_CORPUS[kind]
    before = _landing_files(api.settings.data_dir)
    headers = {**api.headers, "Content-Type": bad.content_type, **dict(bad.headers)}
    response = api.client.post(f"/v1/ingest/{bad.source}", content=bad.body, headers=headers)
    error = _assert_error(response, bad.status, bad.code, bad.says)
    for field, value in (bad.where or {}).items():
        assert error.get(field) == value, error
    assert _landing_files(api.settings.data_dir) == before


@pytest.mark.reliability
@pytest.mark.parametrize("kind", list(QUERY_CORPUS))
def test_sql_that_reaches_outside_the_tables_is_refused(api: Api, kind: str) -> None:
    sql, says = QUERY_CORPUS[kind]
    response = api.client.post("/v1/query", json={"sql": sql}, headers=api.headers)
    _assert_error(response, 400, "query_error", says)
    assert not Path("/tmp/x.csv").exists() and not Path("/tmp/y.csv").exists()


@pytest.mark.reliability
def test_malformed_query_requests_are_422(api: Api) -> None:
    for body in (b"{", b'{"sql": 1}', b'{"sql": ""}', b"[]"):
        response = api.client.post(
            "/v1/query", content=body, headers={**api.headers, "Content-Type": JSON}
        )
        _assert_error(response, 422, "invalid_request", "does not match the schema")


ACCEPTED_BY_DESIGN: dict[str, tuple[bytes, str]] = {
    "bom_json": (b"\xef\xbb\xbf" + GOOD.replace(b'"d"', b'"bom-json"'), JSON),
    "bom_ndjson": (b"\xef\xbb\xbf" + GOOD.replace(b'"d"', b'"bom-ndjson"') + b"\n", NDJSON),
    "bom_csv": (b"\xef\xbb\xbfts,device_id,sensor,value\n2026-11-01T00:00:00Z,bom-csv,s,1\n", CSV),
    "duplicate_keys": (b'{"ts":"2026-11-01T00:00:00Z","device_id":"dup","sensor":"s",'
                       b'"value":1,"value":2}', JSON),
    "duplicate_keys_slow_path": (b'[{"ts":"2026-11-01T00:00:00Z","device_id":"dup2","sensor":"s",'
                                 b'"value":1,"value":2,"x":[1,{"a":1}]},{"x":1}]', JSON),
    "huge_float": (b'{"ts":"2026-11-01T00:00:00Z","device_id":"huge1","sensor":"s","value":1e400}',
                   JSON),
    "huge_integer": (b'{"ts":"2026-11-01T00:00:00Z","device_id":"huge2","sensor":"s","value":1'
                     + b"0" * 400 + b"}", JSON),
    "mixed_types_in_a_column": (
        b'[{"ts":"2026-11-01T00:00:00Z","device_id":"mix","sensor":"a","value":1},'
        b'{"ts":"2026-11-01T00:00:00Z","device_id":"mix","sensor":"b","value":"x"},'
        b'{"ts":"2026-11-01T00:00:00Z","device_id":"mix","sensor":"c","value":true},'
        b'{"ts":"2026-11-01T00:00:00Z","device_id":"mix","sensor":"d","value":[1]}]', JSON),
    "nul_escape_and_odd_keys": (b'{"ts":"2026-11-01T00:00:00Z","device_id":"odd","sensor":"s",'
                                b'"value":1,"a\\u0000b":1,"":2,"' + b"k" * 10_000 + b'":3}', JSON),
}  # fmt: skip


@pytest.mark.reliability
def test_inputs_accepted_by_design_have_their_documented_outcome(api: Api) -> None:
    headers = api.headers
    for kind, (body, content_type) in ACCEPTED_BY_DESIGN.items():
        response = api.client.post(
            "/v1/ingest/readings", content=body, headers={**headers, "Content-Type": content_type}
        )
        assert response.status_code == 202, (kind, response.text)
    assert Processor(api.settings, load_contracts()).run_once().failures == []
    silver = pl.read_delta(str(api.settings.data_dir / "silver" / "readings"))
    value = dict(silver.filter(pl.col("sensor") == "s").select("device_id", "value").iter_rows())
    # BOM skipped in every format; the first of repeated keys wins on every parse path.
    assert value["bom-json"] == value["bom-ndjson"] == value["bom-csv"] == 1.0
    assert value["dup"] == value["dup2"] == 1.0
    assert value["odd"] == 1.0
    assert silver.filter(pl.col("device_id") == "mix")["sensor"].to_list() == ["a"]
    quarantine = pl.read_delta(str(api.settings.data_dir / "quarantine" / "readings"))
    reasons = dict(quarantine.select("device_id", "_reason").iter_rows())
    assert "value: cannot parse" in reasons["huge1"]
    assert reasons["huge2"].startswith("value: cannot parse '1000000")
    mixed = quarantine.filter(pl.col("device_id") == "mix")["_reason"].to_list()
    assert len(mixed) == 3 and all(r.startswith("value: cannot parse") for r in mixed)
