"""config.yaml -> typed, validated settings. Unknown keys are errors; every error names file, key and fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .catalog import CAPABILITIES, Model


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: key: problem. Fix: ...`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts. `first_byte_s` bounds the wait for response headers, `idle_s` the gap between chunks."""

    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(60.0, gt=0)
    idle_s: float = Field(60.0, gt=0)
    total_s: float = Field(600.0, gt=0)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    cors_allow_origins: tuple[str, ...] = ()
    sse_keepalive_s: float = Field(15.0, ge=0)  # 0 disables `: ping` comments
    shutdown_grace_s: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class StoreSettings(_Strict):
    kind: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None  # REDIS_URL in the environment wins

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "StoreSettings":
        if self.kind == "redis" and not self.resolved_redis_url():
            raise ValueError("kind is redis but no redis_url is set; set store.redis_url or REDIS_URL")
        return self

    def resolved_redis_url(self) -> str | None:
        return os.environ.get("REDIS_URL") or self.redis_url


class DemoSettings(_Strict):
    """The quick-start development key: from `key_env` if set there, else generated and printed once."""

    enabled: bool = False
    key_env: str = "EDGE_PROXY_DEMO_KEY"
    plan: str = "demo"


class PoliciesSettings(_Strict):
    dir: str = "policies"
    watch_interval_s: float = Field(2.0, ge=0)  # 0 disables the file watch (SIGHUP still reloads)


class ProviderSettings(_Strict):
    """An upstream. `kind: demo` starts the built-in demo upstream in-process instead of calling out."""

    kind: Literal["http", "demo"] = "http"
    base_url: str | None = None
    format: Literal["openai"] = "openai"
    api_key_env: str | None = None
    api_key_file: str | None = None
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"  # prefix before the key; "" sends the bare key (e.g. `x-api-key`)
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _http_needs_url(self) -> "ProviderSettings":
        if self.kind == "http" and not self.base_url:
            raise ValueError("kind http needs base_url, e.g. https://api.openai.com/v1")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
        return self


class ModelSettings(_Strict):
    id: str = Field(min_length=1)
    name: str
    creator: str
    capability: str
    provider: str
    upstream_model: str
    max_output_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _known_capability(self) -> "ModelSettings":
        if self.capability not in CAPABILITIES:
            raise ValueError(f"capability {self.capability!r} is not one of {', '.join(CAPABILITIES)}")
        return self

    def to_model(self) -> Model:
        return Model(**self.model_dump())


class Config(_Strict):
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    demo: DemoSettings = DemoSettings()
    policies: PoliciesSettings = PoliciesSettings()
    providers: dict[str, ProviderSettings] = {}
    models: tuple[ModelSettings, ...] = ()
    base_dir: str = "."  # set by the loader: relative paths resolve against the config file's folder

    @model_validator(mode="after")
    def _models_reference_providers(self) -> "Config":
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.provider not in self.providers:
                raise ValueError(
                    f"models[{i}] ({m.id}) names provider {m.provider!r}, which is not under providers; "
                    f"declare it or use one of: {', '.join(self.providers) or '(none declared)'}"
                )
            if m.id in seen:
                raise ValueError(f"models[{i}]: id {m.id!r} is declared twice; model ids must be unique")
            seen.add(m.id)
        return self

    def catalog(self) -> tuple[Model, ...]:
        return tuple(m.to_model() for m in self.models)

    def path(self, relative: str) -> Path:
        return Path(self.base_dir) / relative


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key. Fix: remove it or correct its spelling"
    if error["type"] == "missing":
        return f"{key}: required key is missing. Fix: add it"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}. Fix: correct this value"


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed YAML; `source` names the file in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, providers, models, ...)")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found. Fix: pass --config with the path of your config.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    config = parse_config(data, str(file))
    return config.model_copy(update={"base_dir": str(file.parent.resolve())})
