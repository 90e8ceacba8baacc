"""Platform settings: environment (`LAKEHOUSE_*`), `.env`, and an optional TOML file.

Precedence, highest first: explicit keyword arguments, environment variables,
`.env`, the TOML file named by `LAKEHOUSE_CONFIG_FILE`, defaults. Settings are
validated once at start-up; :func:`load_settings` turns a validation failure
into :class:`SettingsError` whose message names every offending setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "LAKEHOUSE_"
CONFIG_FILE_ENV = "LAKEHOUSE_CONFIG_FILE"


class SettingsError(ValueError):
    """Raised when the configuration is invalid; the message names each bad setting."""


class Settings(BaseSettings):
    """Everything configurable about one lakehouse deployment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(Path("dados"), description="Root of landing zone and Delta tables.")
    contracts_dir: Path | None = Field(
        None,
        description="Extra directory of contract files (*.toml); overrides built-ins by name.",
    )
    api_host: str = Field("127.0.0.1", min_length=1)
    api_port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest accepted request body, before and after gzip decompression.",
    )
    auto_create_sources: bool = Field(
        False,
        description="Accept data for sources without a contract: it lands in bronze (raw) "
        "until a contract is declared, then silver is built from all of bronze.",
    )
    file_settle_ms: int = Field(
        1000,
        ge=0,
        description="Hand-dropped landing files are read once unchanged this long.",
    )
    batch_max_files: int = Field(1000, ge=1, description="Landing files per bronze micro-batch.")
    batch_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Landing bytes per bronze micro-batch."
    )
    trigger_latency_ms: int = Field(
        200, ge=0, le=60_000, description="Wait after a landing event to gather more files."
    )
    rescan_interval_s: float = Field(
        10.0, gt=0, le=3600, description="Periodic landing re-scan for missed events."
    )
    query_timeout_s: float = Field(30.0, gt=0, le=3600)
    query_max_rows: int = Field(100_000, ge=1)
    query_memory_limit_mb: int = Field(1024, ge=64, description="DuckDB memory per query.")
    query_threads: int = Field(2, ge=1, le=256, description="DuckDB threads per query.")
    retention_bronze_days: int | None = Field(None, ge=1, description="Keep bronze rows this long.")
    retention_silver_days: int | None = Field(None, ge=1, description="Keep silver rows this long.")
    retention_quarantine_days: int | None = Field(None, ge=1)
    retention_gold_days: int | None = Field(None, ge=1, description="Unset: gold is kept forever.")
    compaction_target_mb: int = Field(128, ge=1, description="Target data file size.")
    checkpoint_interval: int = Field(100, ge=1, description="Delta checkpoint every N commits.")
    vacuum_retention_days: int = Field(7, ge=0, description="Keep removed files this long.")
    maintenance_interval_s: float = Field(
        3600.0, gt=0, description="How often the processor compacts, checkpoints and expires."
    )
    mqtt_config: Path | None = Field(
        None, description="TOML/JSON file of the MQTT bridge (`lakehouse up` starts it if set)."
    )
    kafka_config: Path | None = Field(
        None, description="TOML/JSON file of the Kafka bridge (`lakehouse up` starts it if set)."
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    crash_at: str | None = Field(
        None,
        description="Fault injection for tests: 'point[:n]' SIGKILLs the processor at the n-th "
        "pass through that named point. Never set in production.",
    )

    @field_validator("data_dir", "contracts_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        sources.append(file_secret_settings)
        return tuple(sources)

    @property
    def tokens_file(self) -> Path:
        """Where bearer-token hashes are kept (never the secrets themselves)."""
        return self.data_dir / "_meta" / "tokens.json"


def load_settings(**overrides: Any) -> Settings:
    """Build and validate :class:`Settings`, raising :class:`SettingsError` on bad input."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"{CONFIG_FILE_ENV}: config file {config_file!r} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per invalid setting, named as the user would set it (`LAKEHOUSE_API_PORT`)."""
    lines = ["invalid configuration:"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "<root>"
        env_name = ENV_PREFIX + field.upper()
        value = error.get("input")
        lines.append(f"  {env_name} (={value!r}): {error['msg']}")
    return "\n".join(lines)
