"""What a request may cost is bounded before it runs: odd counts are refused, every multiplier is counted, the
bound is forwarded upstream, and the charge afterwards never goes missing nor runs away."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from .gateway_harness import TEST_KEY
from .mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}


async def post_raw(gateway: str, body: bytes, route: str = "/v1/chat/completions") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}{route}", data=body, headers=AUTH) as response:
            return response.status, json.loads(await response.read())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_in_request_json_are_400(gateway: str, provider: MockProvider, constant: str) -> None:
    body = b'{"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % (
        constant.encode())
    status, answer = await post_raw(gateway, body)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert constant in answer["error"]["message"]
    assert provider.received == []


@pytest.mark.parametrize(("name", "value"), [
    ("max_tokens", 10**400), ("max_tokens", 2**31), ("max_tokens", "100"), ("max_tokens", 3.5),
    ("max_tokens", 100.0), ("max_tokens", True), ("max_tokens", 0), ("max_tokens", -5),
    ("max_completion_tokens", 10**400), ("max_completion_tokens", "7"),
    ("n", 10**400), ("n", "2"), ("n", 129), ("n", 0), ("n", 1.5), ("best_of", 10**400), ("best_of", False),
], ids=lambda v: repr(v)[:12])
async def test_counts_the_reservation_relies_on_must_be_sane_integers(
    gateway: str, provider: MockProvider, name: str, value: Any
) -> None:
    status, answer = await post_raw(gateway, json.dumps({**CHAT, name: value}).encode())
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_request", name)
    assert f"`{name}` must be an integer" in answer["error"]["message"]
    assert provider.received == []


async def test_huge_image_count_is_400_not_a_pricing_crash(gateway: str, provider: MockProvider) -> None:
    body = json.dumps({"model": "mock/image", "prompt": "x", "n": 10**400}).encode()
    status, answer = await post_raw(gateway, body, "/v1/images/generations")
    assert (status, answer["error"]["param"]) == (400, "n")
    assert provider.received == []


async def test_null_counts_mean_the_default(gateway: str, provider: MockProvider) -> None:
    status, _ = await post_raw(gateway, json.dumps({**CHAT, "max_tokens": None, "n": None}).encode())
    assert status == 200
