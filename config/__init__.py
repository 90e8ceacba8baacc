"""Configuration: platform settings and source contracts (the bottom of the import stack)."""

from config.contracts import ContractError, ContractRegistry, SourceContract, load_contracts
from config.settings import Settings, SettingsError, load_settings

__all__ = [
    "ContractError",
    "ContractRegistry",
    "Settings",
    "SettingsError",
    "SourceContract",
    "load_contracts",
    "load_settings",
]
