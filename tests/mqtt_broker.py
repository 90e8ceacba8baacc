"""Test support: a real mosquitto broker on free loopback ports, with generated TLS material.

The broker gets three listeners, each with its own authentication
(``per_listener_settings``):

- ``port``: plain TCP, anonymous;
- ``tls_port``: TLS requiring a client certificate signed by the test CA (mTLS);
- ``password_port``: plain TCP, username/password only (``password_file``).

Persistence goes to a directory that survives :meth:`MosquittoBroker.restart`, so a
persistent session (and the messages queued for it) outlives a broker restart, as
in production. Certificates are generated with ``cryptography``: a CA, a server
certificate for ``127.0.0.1``/``localhost``, a client certificate signed by the CA,
and a second client certificate signed by an unrelated CA (the untrusted one).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import free_port, wait_listening

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
BROKER_USER = "bridge"
BROKER_PASSWORD = "s3cret-pass"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the test PKI."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    untrusted_cert: Path  # signed by a CA the broker does not know
    untrusted_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_key = issuer
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def generate_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate, a trusted and an untrusted client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("lakehouse test CA")
    rogue_ca = _ca("some other CA")
    server = _leaf("localhost", ca, server=True)
    client = _leaf("bridge-client", ca, server=False)
    untrusted = _leaf("bridge-client", rogue_ca, server=False)
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        untrusted_cert=directory / "untrusted.pem",
        untrusted_key=directory / "untrusted.key",
    )
    _write_cert(ca[0], files.ca)
    _write_cert(server[0], files.server_cert)
    _write_key(server[1], files.server_key)
    _write_cert(client[0], files.client_cert)
    _write_key(client[1], files.client_key)
    _write_cert(untrusted[0], files.untrusted_cert)
    _write_key(untrusted[1], files.untrusted_key)
    return files


def password_line(user: str, password: str) -> str:
    """A mosquitto 2.x ``password_file`` line (``$7$``: PBKDF2-SHA512, 101 iterations)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"{user}:$7$101${encoded[0]}${encoded[1]}\n"


class MosquittoBroker:
    """One mosquitto process; ports, PKI and persistence are kept across restarts."""

    def __init__(self, directory: Path) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("the mosquitto binary is not installed")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.tls = generate_tls_files(directory / "pki")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port()
        self.password_port = free_port()
        self.persistence_dir = directory / "db"
        self.persistence_dir.mkdir(exist_ok=True)
        self.log = directory / "mosquitto.log"
        password_file = directory / "passwords"
        password_file.write_text(password_line(BROKER_USER, BROKER_PASSWORD))
        password_file.chmod(0o600)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(self._config(password_file))
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self, password_file: Path) -> str:
        tls = self.tls
        return f"""\
per_listener_settings true
persistence true
persistence_location {self.persistence_dir}/
autosave_interval 1
# The bridge defers acknowledgements until its landing file is durable: it needs a
# large inflight window and queue (mosquitto's defaults, 20 and 1000, are far too small).
# MQTT 5 clients (the bridge, the bench's bare subscriber) get the Receive Maximum they
# announce instead of max_inflight_messages, as with the production config.
max_inflight_messages 4000
max_queued_messages 100000
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
{"user root" if os.geteuid() == 0 else ""}

listener {self.port} {self.host}
allow_anonymous true

listener {self.tls_port} {self.host}
allow_anonymous true
cafile {tls.ca}
certfile {tls.server_cert}
keyfile {tls.server_key}
require_certificate true
use_identity_as_username true

listener {self.password_port} {self.host}
allow_anonymous false
password_file {password_file}
"""

    def start(self) -> None:
        """Start mosquitto and wait until every listener accepts connections."""
        assert MOSQUITTO is not None
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()
        ports = [self.port, self.tls_port, self.password_port]
        wait_listening(self._proc, "mosquitto", self.host, ports, self.log.read_text)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence database on a clean exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same ports with the same persistence."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
