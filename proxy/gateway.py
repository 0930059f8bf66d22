"""The gateway's parts, built once at start-up from the config and shared by every request."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

from aiohttp import web

from .auth.api_keys import ApiKey, KeyIndex, generate_key, hash_key, looks_like_key
from .auth.principal import Principal
from .catalog import Model
from .config import Config
from .errors import ApiError
from .upstream.demo import start_demo_upstream
from .upstream.providers import Provider, auth_headers, new_session, read_credential
from .upstream.relay import RelaySettings

log = logging.getLogger("edge_proxy")


@dataclass
class Gateway:
    config: Config
    models: Mapping[str, Model]
    keys: KeyIndex
    providers: dict[str, Provider] = field(default_factory=dict)
    relay: RelaySettings = RelaySettings(keepalive_s=15.0)
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def authenticate(self, request: web.Request) -> Principal:
        """Who is calling: an API key in `Authorization: Bearer sk_...`."""
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise ApiError(
                "missing_credentials",
                "send a credential: Authorization: Bearer <API key or token>",
                headers={"WWW-Authenticate": 'Bearer realm="edge-proxy"'},
            )
        credential = credential.strip()
        record = self.keys.find(credential) if looks_like_key(credential) else None
        if record is None or record.disabled:
            raise ApiError(
                "invalid_api_key",
                "the API key is unknown or disabled",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token", error_description="unknown API key"'},
            )
        return Principal(kind="api_key", account=record.billing_account, plan=record.plan, key_id=record.id)

    def model(self, model_id: object) -> Model:
        if not isinstance(model_id, str) or not model_id:
            raise ApiError("invalid_request", "the body needs a `model` string, e.g. one id from GET /v1/models")
        model = self.models.get(model_id)
        if model is None:
            raise ApiError("model_not_found", f"model {model_id!r} does not exist; GET /v1/models lists them")
        return model

    async def start(self) -> None:
        """Open provider pools (and start the demo upstream if configured)."""
        for name, settings in self.config.providers.items():
            base_url = settings.base_url
            if settings.kind == "demo":
                runner, base_url = await start_demo_upstream()
                self._runners.append(runner)
            credential = read_credential(name, settings, self.config.path("."))
            self.providers[name] = Provider(
                name=name,
                base_url=base_url or "",
                timeouts=settings.timeouts,
                auth_headers=auth_headers(settings, credential),
                session=new_session(settings),
            )

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.session.close()
        for runner in self._runners:
            await runner.cleanup()


def demo_key(config: Config) -> tuple[ApiKey, str | None]:
    """The quick-start key: from the environment, else generated. Returns the record and the new key, if any."""
    given = os.environ.get(config.demo.key_env, "").strip()
    key = given or generate_key()
    record = ApiKey(id="demo", hash=hash_key(key), plan=config.demo.plan)
    return record, (None if given else key)


def build_gateway(config: Config) -> Gateway:
    keys: list[ApiKey] = []
    if config.demo.enabled:
        record, new_key = demo_key(config)
        keys.append(record)
        if new_key:
            # Printed once, to the console only: the quick start needs it and it is never stored.
            print(f"edge-proxy: demo API key (set {config.demo.key_env} to choose your own): {new_key}", flush=True)
    return Gateway(
        config=config,
        models={m.id: m for m in config.catalog()},
        keys=KeyIndex(keys),
        relay=RelaySettings(keepalive_s=config.server.sse_keepalive_s),
    )
