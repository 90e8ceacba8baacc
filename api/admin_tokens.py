"""``/v1/admin/tokens``: the token lifecycle over HTTP (scope ``admin``), as ``lakehouse tokens``.

Secrets appear only in the answers of create and rotate (with ``Cache-Control:
no-store``); listings show names, scopes, times and limits, never a secret or hash.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import scoped
from api.context import ApiContext, get_context
from api.errors import ApiError
from api.tokens import TokenError, TokenExists, TokenInfo, TokenNotFound, info, parse_duration

router = APIRouter(tags=["admin"], dependencies=[scoped("admin")])  # type: ignore[list-item]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid name, scope, duration or limit"},
    404: {"description": "No token has this name"},
    409: {"description": "A live token already has this name"},
}
_NO_STORE = {"Cache-Control": "no-store"}


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class CreateToken(BaseModel):
    name: str = Field(description="1-64 letters, digits, '_', '.', '@' or '-'.")
    scopes: list[str] = Field(
        min_length=1, description="admin, query, metrics, ingest:* or ingest:<src>"
    )
    expires_in: str | None = Field(
        None, description="Lifetime such as 30d, 12h, 90s (unset: never expires)."
    )
    rate_rows_per_s: float | None = Field(None, gt=0, description="Override of the rows limit.")
    rate_bytes_per_s: float | None = Field(None, gt=0, description="Override of the bytes limit.")


class TokenSecret(BaseModel):
    """A token and its secret: shown this once, never again."""

    token: TokenInfo
    secret: str


class TokenRevoked(BaseModel):
    token: TokenInfo


def token_error(exc: TokenError) -> ApiError:
    if isinstance(exc, TokenNotFound):
        return ApiError(404, "unknown_token", str(exc))
    if isinstance(exc, TokenExists):
        return ApiError(409, "token_exists", str(exc))
    return ApiError(400, "invalid_token_request", str(exc))


@router.get("/v1/admin/tokens", response_model=TokenList)
async def list_tokens(context: ApiContext = Depends(get_context)) -> TokenList:
    """Every token: name, scopes, status, created, last used, expiry, rotation, limits."""
    return TokenList(tokens=[info(record) for record in context.tokens.records()])


@router.post("/v1/admin/tokens", status_code=201, response_model=TokenSecret, responses=ERRORS)
async def create_token(
    request: CreateToken, response: Response, context: ApiContext = Depends(get_context)
) -> TokenSecret:
    """Create a token; the answer holds its secret, the only time it is shown."""
    store = context.tokens
    try:
        expires = None if request.expires_in is None else parse_duration(request.expires_in)
        secret = await run_in_threadpool(
            lambda: store.create(
                request.name,
                request.scopes,
                expires_in_s=expires,
                rate_rows_per_s=request.rate_rows_per_s,
                rate_bytes_per_s=request.rate_bytes_per_s,
            )
        )
        record = store.get(request.name)
    except TokenError as exc:
        raise token_error(exc) from None
    response.headers.update(_NO_STORE)
    return TokenSecret(token=info(record), secret=secret)


@router.post("/v1/admin/tokens/{name}/rotate", response_model=TokenSecret, responses=ERRORS)
async def rotate_token(
    name: str,
    response: Response,
    grace: str | None = Query(
        None,
        description="How long the old secret keeps working, e.g. 1h, 90s, 0 "
        "(default: LAKEHOUSE_TOKEN_ROTATION_GRACE_S).",
    ),
    context: ApiContext = Depends(get_context),
) -> TokenSecret:
    """A new secret for ``name``; the old one works until the grace period ends."""
    store = context.tokens
    try:
        grace_s = (
            context.settings.token_rotation_grace_s if grace is None else parse_duration(grace)
        )
        secret, record = await run_in_threadpool(store.rotate, name, grace_s)
    except TokenError as exc:
        raise token_error(exc) from None
    response.headers.update(_NO_STORE)
    return TokenSecret(token=info(record), secret=secret)


@router.delete("/v1/admin/tokens/{name}", response_model=TokenRevoked, responses=ERRORS)
async def revoke_token(name: str, context: ApiContext = Depends(get_context)) -> TokenRevoked:
    """Revoke ``name`` now: its secrets (current and rotated-out) get ``401 revoked``."""
    try:
        record = await run_in_threadpool(context.tokens.revoke, name)
    except TokenError as exc:
        raise token_error(exc) from None
    return TokenRevoked(token=info(record))
