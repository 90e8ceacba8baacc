"""Test support: the production Nginx configuration of ``deploy/nginx/``, run for real.

Debian's ``nginx`` runs in the foreground (``daemon off``) with everything it writes
(pid, logs, temp files) in a temporary directory, on free loopback ports, with a
certificate signed by a test CA. The configuration is the repository's own: the main
``deploy/nginx/nginx.conf`` with its container paths pointed at the temporary directory,
and ``deploy/nginx/templates/lakehouse.conf.template`` rendered as envsubst would render
it, from the defaults in ``deploy/nginx/lakehouse.env`` plus the test's overrides.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.helpers import REPO, free_port, wait_listening
from tests.mqtt_broker import TlsFiles, generate_tls_files

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
NGINX_DIR = REPO / "deploy" / "nginx"
MAIN_CONF = NGINX_DIR / "nginx.conf"
TEMPLATE = NGINX_DIR / "templates" / "lakehouse.conf.template"
TEMPLATE_ENV = NGINX_DIR / "lakehouse.env"
# What envsubst replaces in the template: ${NAME} of the LH_* variables.
PLACEHOLDER = re.compile(r"\$\{(LH_[A-Z0-9_]+)\}")


def template_defaults() -> dict[str, str]:
    """The ``LH_*`` values of ``deploy/nginx/lakehouse.env``."""
    values = {}
    for line in TEMPLATE_ENV.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{TEMPLATE_ENV}: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def template_placeholders() -> set[str]:
    return set(PLACEHOLDER.findall(TEMPLATE.read_text()))


def render_template(values: Mapping[str, str]) -> str:
    """The template with every placeholder filled; an undefined one is an error."""
    text = TEMPLATE.read_text()
    missing = template_placeholders() - set(values)
    if missing:
        raise AssertionError(f"{TEMPLATE}: no value for {sorted(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"{MAIN_CONF}: expected one line matching {pattern!r}")
    return new


def local_main_conf(directory: Path, site_conf: Path) -> str:
    """``deploy/nginx/nginx.conf`` with its container paths moved into ``directory``."""
    text = MAIN_CONF.read_text()
    # Workers of a root master run as `nobody` by default, who cannot enter pytest's
    # private temporary directories.
    user = "user root;" if os.geteuid() == 0 else ""
    text = _replace_once(text, r"^user \S+;$", user)
    text = _replace_once(text, r"^pid \S+;$", f"pid {directory}/nginx.pid;")
    text = _replace_once(text, r"^error_log \S+ (\w+);$", f"error_log {directory}/error.log info;")
    text = _replace_once(
        text,
        r"^(\s*)access_log \S+ lakehouse;$",
        f"    access_log {directory}/access.log lakehouse;",
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return _replace_once(
        text,
        r"^\s*include /etc/nginx/conf\.d/lakehouse\.conf;$",
        f"{temp_paths}\n    include {site_conf};",
    )


class NginxServer:
    """Nginx with the deploy configuration in front of ``upstream`` (host:port)."""

    def __init__(self, directory: Path, upstream: str, **overrides: str) -> None:
        if NGINX is None:
            raise RuntimeError(
                "nginx is not installed: run `make system-deps` (apt-get install nginx)"
            )
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tmp").mkdir(exist_ok=True)
        self.tls: TlsFiles = generate_tls_files(directory / "pki")
        self.host = "127.0.0.1"
        self.http_port = free_port()
        self.https_port = free_port()
        self.values = {
            **template_defaults(),
            "LH_SERVER_NAME": "localhost",
            "LH_HTTP_LISTEN": f"{self.host}:{self.http_port}",
            "LH_HTTPS_LISTEN": f"{self.host}:{self.https_port}",
            "LH_UPSTREAM": upstream,
            "LH_TLS_CERT": str(self.tls.server_cert),
            "LH_TLS_KEY": str(self.tls.server_key),
            **overrides,
        }
        self.site_conf = directory / "lakehouse.conf"
        self.site_conf.write_text(render_template(self.values))
        self.conf = directory / "nginx.conf"
        self.conf.write_text(local_main_conf(directory, self.site_conf))
        self.error_log = directory / "error.log"
        self.output = directory / "nginx.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def https_url(self) -> str:
        return f"https://{self.host}:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _command(self, *extra: str) -> list[str]:
        assert NGINX is not None
        return [NGINX, "-p", str(self.directory), "-c", str(self.conf), *extra]

    def check(self) -> None:
        """``nginx -t``: the configuration parses and its files load."""
        result = subprocess.run(self._command("-t"), capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{result.stderr}\n{self.site_conf}")

    def start(self) -> None:
        self.check()
        handle = open(self.output, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self._proc = subprocess.Popen(
            self._command("-g", "daemon off;"), stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()
        ports = [self.http_port, self.https_port]
        wait_listening(self._proc, "nginx", self.host, ports, self.log_text)

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.output, self.error_log) if p.exists()]
        return "\n".join(parts)
