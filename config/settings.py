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

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "LAKEHOUSE_"
CONFIG_FILE_ENV = "LAKEHOUSE_CONFIG_FILE"
# A directory of one-file-per-setting secrets (Docker/compose secrets: /run/secrets): the
# file `lakehouse_archive_connection_string` (any case) sets archive_connection_string.
# Lowest precedence: the environment, `.env` and the TOML file win over it.
SECRETS_DIR_ENV = "LAKEHOUSE_SECRETS_DIR"

# URI schemes the Delta tables may live under (deltalake/object_store); `file` and plain
# paths are local.
STORAGE_SCHEMES = ("az", "abfs", "abfss", "adl", "azure", "s3", "s3a", "gs", "gcs", "file")
# Settings whose values are credentials: never echoed in errors (or repr, via SecretStr).
SECRET_SETTINGS = frozenset(
    {"storage_options", "azure_storage_account_key", "archive_connection_string"}
)


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
    api_workers: int = Field(
        1, ge=1, le=64, description="API worker processes behind the one port (`--workers`)."
    )
    idempotency_window_s: float = Field(
        86_400.0,
        gt=0,
        description="How long an Idempotency-Key is remembered (a retry within it returns "
        "the first answer).",
    )
    max_backlog_files: int | None = Field(
        100_000,
        ge=1,
        description="Ingest answers 503 while more landing files wait (unset: no bound).",
    )
    max_backlog_bytes: int | None = Field(
        10 * 1024**3, ge=1, description="Ingest answers 503 while more landing bytes wait."
    )
    max_backlog_age_s: float | None = Field(
        None, gt=0, description="Ingest answers 503 while a landing file waits longer."
    )
    min_free_disk_mb: int = Field(
        256, ge=0, description="Ingest answers 503 while the landing file system has less free."
    )
    group_commit_ms: float = Field(
        3.0,
        ge=0,
        le=1000,
        description="Small ingest requests gather this long at most behind a running write, "
        "then share one landing file and fsync (0: every request writes its own file).",
    )
    group_commit_max_body_bytes: int = Field(
        64 * 1024, ge=0, description="Only bodies up to this size are group-committed."
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
    batch_max_rows: int = Field(
        250_000,
        ge=1,
        description="Rows per bronze micro-batch (bounds the processor's memory: two "
        "micro-batches, one ingested ahead during a backlog, ~4 KiB/row each).",
    )
    gold_catch_up_ms: int = Field(
        1000,
        ge=0,
        le=3_600_000,
        description="While files wait beyond the current bronze micro-batch, refresh gold at "
        "most this often (0: after every micro-batch); without a backlog, after every one.",
    )
    # Short: while the processor works, files pile up and make the next micro-batch
    # anyway; this wait only gathers the files of a burst that hits an idle processor,
    # and every freshness figure pays it in full.
    trigger_latency_ms: int = Field(
        50, ge=0, le=60_000, description="Wait after a landing event to gather more files."
    )
    rescan_interval_s: float = Field(
        10.0, gt=0, le=3600, description="Periodic landing re-scan for missed events."
    )
    ready_max_backlog_age_s: float | None = Field(
        300.0, gt=0, description="/ready fails while a landing file waits longer (None: never)."
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
    log_retention_hours: float = Field(
        1.0,
        ge=0,
        le=24 * 365,
        description="Keep Delta log entries a checkpoint supersedes this long (time travel and "
        "table history reach this far back). deltalake lists the whole log on every commit "
        "(~17 us per entry here), and a busy table commits several times a second: keep it "
        "short.",
    )
    maintenance_interval_s: float = Field(
        600.0,
        gt=0,
        description="How often the processor compacts, checkpoints, cleans the log and expires.",
    )
    mqtt_config: Path | None = Field(
        None, description="TOML/JSON file of the MQTT bridge (`lakehouse up` starts it if set)."
    )
    kafka_config: Path | None = Field(
        None, description="TOML/JSON file of the Kafka bridge (`lakehouse up` starts it if set)."
    )
    storage_uri: str | None = Field(
        None,
        description="Where the Delta tables live: az://container/prefix, abfs[s]://..., "
        "s3://bucket/prefix, gs://bucket/prefix or a local path. Unset: under data_dir. "
        "The landing zone, locks and replay intents stay under data_dir (local disk).",
    )
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="deltalake/object_store options for storage_uri (JSON object in the "
        "environment), e.g. account_key, aws_access_key_id, aws_endpoint, use_emulator.",
    )
    azure_storage_account_name: str | None = Field(
        None, description="Azure account of az:// tables and of the archive container."
    )
    azure_storage_account_key: SecretStr | None = Field(
        None, description="Key of azure_storage_account_name."
    )
    archive_uri: str | None = Field(
        None,
        description="az://container[/prefix]: processed landing files (data_dir/archive) are "
        "uploaded there. Unset: the local archive is kept and never pruned.",
    )
    archive_connection_string: SecretStr | None = Field(
        None,
        description="Azure Storage connection string for archive uploads (else the account "
        "name and key are used).",
    )
    archive_account_url: str | None = Field(
        None,
        description="Blob endpoint of the archive account; default "
        "https://<account>.blob.core.windows.net.",
    )
    archive_upload_concurrency: int = Field(4, ge=1, le=64, description="Parallel uploads.")
    archive_upload_retries: int = Field(
        5, ge=0, le=50, description="Retries of an upload after a transient error."
    )
    archive_retention_days: float | None = Field(
        None,
        ge=0,
        description="Remove a local archive file this many days after it landed, once its "
        "upload is verified. Unset: never remove.",
    )
    token_rotation_grace_s: float = Field(
        3600.0,
        ge=0,
        description="After `tokens rotate`, the old secret keeps working this long (default).",
    )
    metrics_auth: bool = Field(
        False,
        description="/metrics of the API and of `lakehouse process`/`bridge ... --metrics-port` "
        "requires a bearer token with scope `metrics` (or `admin`); off: open to whoever "
        "reaches the port.",
    )
    rate_limit_rows_per_s: float | None = Field(
        None,
        gt=0,
        description="Ingest rows per second per token and source (token bucket; unset: off).",
    )
    rate_limit_bytes_per_s: float | None = Field(
        None,
        gt=0,
        description="Ingest body bytes (after gzip) per second per token and source (unset: off).",
    )
    rate_limit_burst_s: float = Field(
        10.0,
        gt=0,
        le=86400,
        description="Bucket capacity, in seconds of the rate: a full bucket admits rate x this.",
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    crash_at: str | None = Field(
        None,
        description="Fault injection for tests: 'point[:n]' SIGKILLs the process at the n-th "
        "pass through that named point: the processor's (delta_processing.crashpoints) or the "
        "MQTT bridge's mqtt_* (config.crash_hook). Never set in production.",
    )

    @field_validator("data_dir", "contracts_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("storage_uri")
    @classmethod
    def _check_storage_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if "://" not in value:
            return value  # a local path
        scheme, _, rest = value.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}; LAKEHOUSE_STORAGE_URI takes az://, abfs://, "
                "abfss://, s3://, gs://, file:// or a local path"
            )
        if scheme.lower() != "file" and not rest.split("/", 1)[0]:
            raise ValueError(f"LAKEHOUSE_STORAGE_URI needs a container or bucket: {value!r}")
        return value.rstrip("/")

    @field_validator("archive_uri")
    @classmethod
    def _check_archive_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme, sep, rest = value.strip().partition("://")
        if not sep or scheme.lower() != "az" or not rest.split("/", 1)[0]:
            raise ValueError(
                "LAKEHOUSE_ARCHIVE_URI must be az://<container> or az://<container>/<prefix>, "
                f"not {value!r}"
            )
        return value.strip().rstrip("/")

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
        secrets_dir = os.environ.get(SECRETS_DIR_ENV)
        sources.append(
            SecretsSettingsSource(settings_cls, secrets_dir=Path(secrets_dir))
            if secrets_dir
            else file_secret_settings
        )
        return tuple(sources)

    @property
    def tokens_file(self) -> Path:
        """Where bearer-token hashes are kept (never the secrets themselves)."""
        return self.data_dir / "_meta" / "tokens.json"

    @property
    def rate_limits_file(self) -> Path:
        """Token-bucket state shared by the API's worker processes (SQLite, WAL)."""
        return self.data_dir / "_meta" / "ratelimits.sqlite"


def load_settings(**overrides: Any) -> Settings:
    """Build and validate :class:`Settings`, raising :class:`SettingsError` on bad input."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"{CONFIG_FILE_ENV}: config file {config_file!r} does not exist")
    secrets_dir = os.environ.get(SECRETS_DIR_ENV)
    if secrets_dir and not Path(secrets_dir).is_dir():
        raise SettingsError(f"{SECRETS_DIR_ENV}: secrets directory {secrets_dir!r} does not exist")
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
        value = "**********" if field.split(".")[0] in SECRET_SETTINGS else error.get("input")
        lines.append(f"  {env_name} (={value!r}): {error['msg']}")
    return "\n".join(lines)
