"""Bearer authentication and scope checks for the API's routes.

Every refusal is logged as one ``auth.failed`` warning with the token's name
(``"unknown"`` when no token matches; never the secret), the client address,
the path and a ``reason``: ``missing``, ``invalid``, ``expired``, ``revoked`` or
``insufficient_scope``. Expired and revoked tokens get ``401`` saying so.
"""

from __future__ import annotations

from contextvars import ContextVar

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from api.context import ApiContext, get_context
from api.errors import ApiError
from api.tokens import TokenRecord, TokenStore

_bearer = HTTPBearer(auto_error=False, description="Token from `lakehouse tokens create`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
# The client and path of the request being authenticated, for the scope check's log line.
_request_origin: ContextVar[tuple[str, str]] = ContextVar(
    "auth_request_origin", default=("unknown", "")
)

log = structlog.get_logger(__name__)


def auth_failed(reason: str, token: str, client: str, path: str, **extra: object) -> None:
    """The one log line of a refused request (``token`` is a name, never a secret)."""
    log.warning("auth.failed", reason=reason, token=token, client=client, path=path, **extra)


async def authenticated(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    context: ApiContext = Depends(get_context),
) -> TokenRecord:
    """The caller's token record; 401 when the token is missing, unknown, expired or revoked."""
    client = request.client.host if request.client else "unknown"
    secret = None if credentials is None else credentials.credentials
    return await token_of(secret, context.tokens, client, request.url.path)


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer <secret>`` header value, read the way
    :class:`fastapi.security.HTTPBearer` reads it; ``None`` if there is none."""
    scheme, secret = get_authorization_scheme_param(authorization)
    if not scheme or not secret or scheme.lower() != "bearer":
        return None
    return secret


async def token_of(secret: str | None, store: TokenStore, client: str, path: str) -> TokenRecord:
    """The record of the bearer ``secret`` presented by ``client`` for ``path``; 401 (logged)
    when it is missing, unknown, expired or revoked."""
    _request_origin.set((client, path))
    if secret is None:
        auth_failed("missing", "unknown", client, path)
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token (Authorization: Bearer <token>)",
            headers=_CHALLENGE,
        )
    verdict = store.check(secret)  # a stat and a few hash compares
    if verdict.record is None or not verdict.accepted:
        name = verdict.record.name if verdict.record else "unknown"
        auth_failed(verdict.refusal or "invalid", name, client, path)
        raise ApiError(
            401,
            "unauthorized",
            verdict.message,
            headers=_CHALLENGE,
            reason=verdict.refusal,
        )
    record = verdict.record
    if store.touch_due(record):  # at most once a minute per token and process
        try:
            await run_in_threadpool(store.touch, record.name)
        except OSError as exc:  # bookkeeping only: never fail a valid request over it
            log.warning("auth.last_used_not_recorded", token=record.name, error=str(exc))
    return record


def require_scope(record: TokenRecord, scope: str) -> None:
    """403 unless ``record`` grants ``scope``."""
    if not record.allows(scope):
        client, path = _request_origin.get()
        auth_failed("insufficient_scope", record.name, client, path, scope=scope)
        raise ApiError(
            403, "forbidden", f"token {record.name!r} lacks scope {scope!r}", scope=scope
        )


def scoped(scope: str) -> object:
    """Dependency factory: an authenticated token that grants ``scope``."""

    def dependency(record: TokenRecord = Depends(authenticated)) -> TokenRecord:
        require_scope(record, scope)
        return record

    return Depends(dependency)
