"""The HTTP API: writes landing files and reads through :mod:`analytics` only."""

from api.app import create_app

__all__ = ["create_app"]
