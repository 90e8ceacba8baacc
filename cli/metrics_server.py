"""Prometheus ``/metrics`` of a standalone process, answered only to bearer tokens.

``lakehouse process`` and ``lakehouse bridge ...`` with ``--metrics-port N`` serve their
metrics with :func:`prometheus_client.start_http_server` while ``LAKEHOUSE_METRICS_AUTH``
is off (:func:`cli.common.serve_metrics`).
That function has no authentication hook, so with the setting on the same WSGI app
(:func:`prometheus_client.make_wsgi_app`) is served from here behind
:class:`BearerAuth`: the token must be in the API's store (``settings.tokens_file``,
re-read when it changes, so ``lakehouse tokens ...`` applies without a restart) and
grant scope ``metrics``, refusals answered and logged as :mod:`api.auth` does.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from api.auth import auth_failed, bearer_secret
from api.errors import error_body
from api.tokens import METRICS_SCOPE, TokenStore

log = structlog.get_logger(__name__)

_STATUS_LINES = {401: "401 Unauthorized", 403: "403 Forbidden"}
# Answered without a token (and without metrics): what container health checks probe.
HEALTH_PATH = "/health"


class BearerAuth:
    """WSGI middleware: a request whose bearer token grants ``scope`` reaches ``app``.

    Any other gets the API's answers: 401 with ``WWW-Authenticate: Bearer`` when the
    token is missing, unknown, expired or revoked, 403 when it lacks the scope; each
    refusal is one ``auth.failed`` warning naming the token, never its secret.
    """

    def __init__(
        self, app: WSGIApplication, tokens: TokenStore, scope: str = METRICS_SCOPE
    ) -> None:
        self._app = app
        self._tokens = tokens
        self._scope = scope

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer one request: refused here, or passed on to the wrapped app."""
        client = str(environ.get("REMOTE_ADDR") or "unknown")
        path = str(environ.get("PATH_INFO") or "/")
        if path == HEALTH_PATH:  # liveness for container health checks: no metrics in it
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        secret = bearer_secret(environ.get("HTTP_AUTHORIZATION"))
        if secret is None:
            auth_failed("missing", "unknown", client, path)
            return _refuse(
                start_response, 401, "missing bearer token (Authorization: Bearer <token>)"
            )
        verdict = self._tokens.check(secret)  # a stat and a few hash compares
        record = verdict.record
        if record is None or not verdict.accepted:
            name = record.name if record else "unknown"
            auth_failed(verdict.refusal or "invalid", name, client, path)
            return _refuse(start_response, 401, verdict.message, reason=verdict.refusal)
        if not record.allows(self._scope):
            auth_failed("insufficient_scope", record.name, client, path, scope=self._scope)
            message = f"token {record.name!r} lacks scope {self._scope!r}"
            return _refuse(start_response, 403, message, scope=self._scope)
        if self._tokens.touch_due(record):  # "last used", as the API keeps it
            try:
                self._tokens.touch(record.name)
            except OSError as exc:  # bookkeeping only: never fail a valid scrape over it
                log.warning("auth.last_used_not_recorded", token=record.name, error=str(exc))
        return self._app(environ, start_response)


def _refuse(
    start_response: StartResponse, status: int, message: str, **details: object
) -> list[bytes]:
    """A refusal in the API's error shape (``{"error": {"code", "message", ...}}``)."""
    code = "unauthorized" if status == 401 else "forbidden"
    body = json.dumps(error_body(code, message, **details)).encode("utf-8")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    start_response(_STATUS_LINES[status], headers)
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """A request handler that writes no access line: a scrape every few seconds would
    flood the process's JSON log on stderr (refusals are logged by :class:`BearerAuth`)."""

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing."""


def start_authenticated_metrics_server(
    port: int, addr: str, registry: CollectorRegistry, tokens: TokenStore
) -> ThreadingWSGIServer:
    """Serve ``registry`` on ``addr:port`` from a daemon thread, to bearers of a token of
    ``tokens`` with scope ``metrics`` only; returns the server (``shutdown()`` stops it)."""
    # IPv4 or IPv6 as the address asks, as start_http_server chooses.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    app = BearerAuth(make_wsgi_app(registry), tokens)
    server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="lakehouse-metrics", daemon=True)
    thread.start()
    return server
