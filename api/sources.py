"""``GET /v1/sources``: the declared sources and their contracts (scope ``query``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api.auth import scoped
from api.context import ApiContext, get_context
from api.errors import ApiError

router = APIRouter(tags=["sources"], dependencies=[scoped("query")])  # type: ignore[list-item]


@router.get("/v1/sources")
async def list_sources(context: ApiContext = Depends(get_context)) -> list[dict[str, Any]]:
    """Every source with its contract: fields, keys, event time, sequence, rules, gold."""
    return [contract.model_dump(mode="json") for contract in context.contracts.values()]


@router.get("/v1/sources/{source}", responses={404: {"description": "Unknown source"}})
async def get_source(source: str, context: ApiContext = Depends(get_context)) -> dict[str, Any]:
    """One source's contract."""
    contract = context.contracts.get(source)
    if contract is None:
        raise ApiError(404, "unknown_source", f"unknown source {source!r}", source=source)
    return contract.model_dump(mode="json")
