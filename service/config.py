"""Settings: one validated class, read from the environment (prefix ``ONEPASS_``).

Built by :func:`get_settings` inside the app factory or the CLI, never at import time, so tests pass
their own instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the package's committed demo model lives when no model store is configured.
REPO_ROOT = Path(__file__).resolve().parent.parent

_WEAK_TOKENS = {"changeme", "admin", "secret", "token", "password"}


class Settings(BaseSettings):
    """Every knob of the server and the CLI. Units are in the names (``_s``, ``_ms``, ``_bytes``)."""

    # hide_input_in_errors: a rejected admin token must not be echoed into logs by the error message.
    model_config = SettingsConfigDict(env_prefix="ONEPASS_", extra="ignore", hide_input_in_errors=True)

    # Model and graph
    model_store: Path = Field(REPO_ROOT / "model_store", description="model repository folder")
    model_name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model_version: str | None = Field(None, description="version folder; default: the store's pointer")
    data_dir: Path | None = Field(None, description="database folder; default: the model's demo database")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    torch_threads: int = Field(
        1,
        ge=0,
        description="intra-op CPU threads for torch (0 = torch's default). Serving batches are small: "
        "OpenMP fan-out costs more than it gains and fights the event loop for cores (see docs/serving.md)",
    )

    # Cache
    redis_url: str | None = Field(None, description="None: `onepass serve` starts a local redis-server")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    cache_dtype: Literal["float32", "float16"] = "float32"
    local_cache_entries: int = Field(200_000, ge=0, description="in-process LRU in front of Redis")
    # Generous enough that a busy event loop (which reads replies late) does not trip the breaker.
    redis_timeout_s: float = Field(0.25, gt=0, le=5)
    breaker_failures: int = Field(3, ge=1, description="consecutive Redis errors that open the breaker")
    breaker_reset_s: float = Field(2.0, gt=0, description="open time before a half-open probe")

    # Requests and batching
    max_ids_per_request: int = Field(1024, ge=1, le=100_000)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="public API request body limit (413 above it)")
    batch_max_size: int = Field(512, ge=1, description="max seed customers in one encoder pass")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    batching: bool = True

    # Listeners
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    admin_port: int = Field(8001, ge=1, le=65535)
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    admin_max_upload_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    graceful_shutdown_s: int = Field(25, ge=1, description="keep below k8s terminationGracePeriodSeconds")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("admin_token")
    @classmethod
    def _refuse_weak_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            raw = v.get_secret_value()
            if len(raw) < 16 or raw.lower() in _WEAK_TOKENS:
                raise ValueError("admin_token must be at least 16 characters and not a default value")
        return v

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.admin_port == self.port:
            raise ValueError("admin_port must differ from port: the admin API has its own listener")
        return self

    def resolved_admin_token(self) -> str | None:
        """The admin token from ``admin_token`` or ``admin_token_file``; None means admin is disabled."""
        if self.admin_token is not None:
            return self.admin_token.get_secret_value()
        if self.admin_token_file is not None:
            raw = self.admin_token_file.read_text().strip()
            if len(raw) < 16:
                raise ValueError(f"admin token in {self.admin_token_file.name} is shorter than 16 characters")
            return raw
        return None


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (tests, CLI flags)."""
    return Settings(**overrides)  # type: ignore[arg-type]
