"""How job adapters call their provider, shared by them: `ProviderCalls` holds the provider's session, keys,
base URL and timeouts; one JSON call sends the provider's credential (and rests it after a 401/429), reads a
bounded answer, follows no redirect, and raises failures as JobCallFailed (retryable or not)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp

from ..config import Timeouts
from ..upstream.credentials import ProviderKeys
from ..upstream.sse import json_object
from .adapter import JobCallFailed

MAX_ANSWER_BYTES = 1024 * 1024  # status and result answers are small JSON; outputs are URLs


def model_path(model: str) -> str:
    """A provider's model id (`owner/name`, fal's `fal-ai/flux/dev`) as URL path segments, each one encoded."""
    return "/".join(quote(part, safe="") for part in model.split("/") if part)


class ProviderCalls:
    """The part every HTTP job adapter shares: one aiohttp session (the provider's pool), the provider's keys,
    per-call timeouts, the base URL (later URLs are built from it, never taken from answers)."""

    def __init__(
        self, name: str, base_url: str, session: aiohttp.ClientSession, keys: ProviderKeys | None, timeouts: Timeouts,
        *, webhooks: bool = False,
    ) -> None:
        self._name = name
        self._webhooks = webhooks  # ask the provider to call the gateway back (proxy/api/webhooks.py)
        self._base = base_url.rstrip("/")
        self._session = session
        self._keys = keys
        self._timeout = aiohttp.ClientTimeout(total=timeouts.first_byte_s + timeouts.idle_s,
                                              connect=timeouts.connect_s)

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await call_json(self._session, self._keys, self._name, self._timeout, method, url, body)


async def call_json(
    session: aiohttp.ClientSession, keys: ProviderKeys | None, provider: str, timeout: aiohttp.ClientTimeout,
    method: str, url: str, body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The answer's JSON object. A 5xx, 408, 429 or connection problem is retryable, and so is a 401 when the
    provider has other keys (the refused one rests, the retry takes another); a 422 is the caller's
    `invalid_request`; other 4xx are `upstream_error` (`detail` of the answer in the message)."""
    chosen = keys.choose() if keys else None
    headers = {"Content-Type": "application/json", **(chosen.headers if chosen else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        async with session.request(method, url, data=data, headers=headers, timeout=timeout,
                                   allow_redirects=False) as response:
            raw = await read_bounded(response)
            if chosen is not None and keys is not None:
                keys.refused(chosen, response.status, response.headers.get("Retry-After"))
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise JobCallFailed(f"{provider} could not be reached ({type(exc).__name__})", retryable=True) from None
    answer = json_object(raw) if len(raw) <= MAX_ANSWER_BYTES else None
    if status >= 400:
        raise JobCallFailed(
            f"{provider} answered {status}: {message((answer or {}).get('detail') or answer)}",
            retryable=status >= 500 or status in (408, 429) or (status == 401 and keys is not None and len(keys) > 1),
            status=status,
            code="invalid_request" if status == 422 else "upstream_error",
        )
    if answer is None:
        raise JobCallFailed(f"{provider} answered something that is not a JSON object", retryable=True)
    return answer


async def read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The body, or its first MAX_ANSWER_BYTES + 1 bytes (then it is refused as too large)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            break
    return bytes(body)


def message(value: Any) -> str:
    """A provider's error detail as one short line (FastAPI's `[{"msg"}]` lists, `{"message"}` objects)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0].get("msg", value[0])
    if isinstance(value, dict):
        value = value.get("message", value)
    return str(value)[:300]
