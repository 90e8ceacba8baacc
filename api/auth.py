"""Bearer authentication and scope checks for the API's routes."""

from __future__ import annotations

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.context import ApiContext, get_context
from api.errors import ApiError
from api.tokens import TokenRecord

_bearer = HTTPBearer(auto_error=False, description="Token from `lakehouse tokens create`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

log = structlog.get_logger(__name__)


def authenticated(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    context: ApiContext = Depends(get_context),
) -> TokenRecord:
    """The caller's token record; 401 when the token is missing or unknown."""
    client = request.client.host if request.client else "unknown"
    if credentials is None or credentials.scheme.lower() != "bearer":
        log.warning("auth.missing_token", client=client, path=request.url.path)
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token (Authorization: Bearer <token>)",
            headers=_CHALLENGE,
        )
    record = context.tokens.verify(credentials.credentials)
    if record is None:
        log.warning("auth.unknown_token", client=client, path=request.url.path)
        raise ApiError(401, "unauthorized", "invalid or revoked token", headers=_CHALLENGE)
    return record


def require_scope(record: TokenRecord, scope: str) -> None:
    """403 unless ``record`` grants ``scope``."""
    if not record.allows(scope):
        log.warning("auth.forbidden", token=record.name, scope=scope)
        raise ApiError(
            403, "forbidden", f"token {record.name!r} lacks scope {scope!r}", scope=scope
        )


def scoped(scope: str) -> object:
    """Dependency factory: an authenticated token that grants ``scope``."""

    def dependency(record: TokenRecord = Depends(authenticated)) -> TokenRecord:
        require_scope(record, scope)
        return record

    return Depends(dependency)
