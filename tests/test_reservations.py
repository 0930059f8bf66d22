"""What a request may cost is bounded before it runs: odd counts are refused, every multiplier is counted, the
bound is forwarded upstream, and the charge afterwards never goes missing nor runs away."""

from __future__ import annotations

import json
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.policy.pricing import MEDIA_PART_TOKENS

from .conftest import StartGateway
from .gateway_harness import TEST_KEY, budget_policy
from .mock_provider import Handler, MockProvider

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


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("value", ["100", [1], True, 1.5, -1, 0], ids=repr)
async def test_max_tokens_next_to_max_completion_tokens_is_checked_too(
    gateway: str, provider: MockProvider, route: str, value: Any
) -> None:
    """Both limits are forwarded (each lowered to the bound), so an odd one beside a sane one is a 400 too: it was
    a 500 from the capping code (a string, a list) or forwarded as sent (-1 means "no limit" to some servers)."""
    body = {"model": "mock/chat", "max_completion_tokens": 5, "max_tokens": value, **(
        {"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT["messages"]})}
    status, answer = await post_raw(gateway, json.dumps(body).encode(), route)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_request", "max_tokens")
    assert provider.received == []


async def test_huge_image_count_is_400_not_a_pricing_crash(gateway: str, provider: MockProvider) -> None:
    body = json.dumps({"model": "mock/image", "prompt": "x", "n": 10**400}).encode()
    status, answer = await post_raw(gateway, body, "/v1/images/generations")
    assert (status, answer["error"]["param"]) == (400, "n")
    assert provider.received == []


async def test_null_counts_mean_the_default(gateway: str, provider: MockProvider) -> None:
    status, _ = await post_raw(gateway, json.dumps({**CHAT, "max_tokens": None, "n": None}).encode())
    assert status == 200


BUDGET = 100
OUTPUT_PRICED = budget_policy(BUDGET, {"mock/chat": "{output_per_1k_tokens: 1000}"}, ("max_output_tokens: 10",))
ALL_PRICED = budget_policy(
    1_000_000, {"mock/chat": "{input_per_1k_tokens: 1000, output_per_1k_tokens: 1000}"}, ("max_output_tokens: 10",))

def answers_with_usage(tokens_per_choice: Callable[[int | None], int]) -> Handler:
    """A chat provider producing `tokens_per_choice(its output limit)` tokens for each of the `n` choices."""

    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = (body.get("n") or 1) * (body.get("best_of") or 1) * tokens_per_choice(limit)
        return web.json_response({
            "id": "cmpl-mock", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
                        for i in range(body.get("n") or 1)],
            "usage": {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion},
        })

    return answer


def honest(limit: int | None) -> int:
    return limit if limit is not None else 1000  # a provider's own default: far more than the gateway's bound


async def post_json(gateway: str, body: dict[str, Any], route: str = "/v1/chat/completions") -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}{route}", json=body, headers=AUTH) as response:
            await response.read()
            return response.status, dict(response.headers)


async def balance(gateway: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/me", headers=AUTH) as response:
            return (await response.json())["balance"]


async def metric(gateway: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{gateway}/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_n_choices_are_reserved_so_a_budget_is_never_overspent(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """n: 8 with max_tokens 10 reserves 80 output tokens: one call fits in 100 credits, a second does not."""
    provider.handler = answers_with_usage(honest)
    gateway = await start_with(OUTPUT_PRICED)
    statuses = [(await post_json(gateway, {**CHAT, "n": 8, "max_tokens": 10}))[0] for _ in range(4)]
    assert statuses == [200, 402, 402, 402]
    state = await balance(gateway)
    assert (state["spent"], state["held"]) == (80, 0)


async def test_without_max_tokens_the_gateways_bound_is_forwarded_upstream(
    start_with: StartGateway, provider: MockProvider
) -> None:
    provider.handler = answers_with_usage(honest)
    gateway = await start_with(OUTPUT_PRICED)
    assert (await post_json(gateway, {**CHAT, "n": 8}))[0] == 200
    assert provider.received[-1].body["max_completion_tokens"] == 10  # the plan's max_output_tokens
    assert "max_tokens" not in provider.received[-1].body
    assert (await balance(gateway))["spent"] == 80


async def test_a_limit_above_the_models_cap_is_lowered_to_the_cap_upstream(
    start_with: StartGateway, provider: MockProvider
) -> None:
    provider.handler = answers_with_usage(honest)
    gateway = await start_with(ALL_PRICED, model_caps={"mock/chat": 16})
    body = {**CHAT, "max_tokens": 5000, "max_completion_tokens": 9000}
    assert (await post_json(gateway, body))[0] == 200
    forwarded = provider.received[-1].body
    assert (forwarded["max_tokens"], forwarded["max_completion_tokens"]) == (16, 16)
    assert (await balance(gateway))["spent"] == 3 + 16


async def test_usage_over_the_reserve_is_charged_up_to_one_more_bound_and_counted(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """A provider that ignores the forwarded bound: the overrun is charged, but at most twice the reserve, so
    the balance goes below zero by at most one request's bound; the overrun is counted."""
    provider.handler = answers_with_usage(lambda limit: 50 * (limit or 1000))
    gateway = await start_with(OUTPUT_PRICED)
    assert await metric(gateway, "edge_proxy_credit_overrun_total") == 0
    assert (await post_json(gateway, {**CHAT, "n": 8, "max_tokens": 10}))[0] == 200
    state = await balance(gateway)
    assert (state["spent"], state["held"], state["remaining"]) == (160, 0, 0)  # 60 over: less than one bound (80)
    assert await metric(gateway, "edge_proxy_credit_overrun_total") == 1
    assert (await post_json(gateway, CHAT))[0] == 402


async def test_image_parts_and_every_prompt_and_best_of_are_reserved(
    start_with: StartGateway, provider: MockProvider
) -> None:
    gateway = await start_with(ALL_PRICED)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    chat = {"model": "mock/chat", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, image, image]}]}
    _, headers = await post_json(gateway, chat)
    budget = 1_000_000
    assert headers["X-Credits-Balance"] == str(budget - (len(json.dumps(chat)) + 2 * MEDIA_PART_TOKENS + 1))

    completions = {"model": "mock/chat", "prompt": ["a", "b", "c"], "n": 2, "best_of": 4, "max_tokens": 5}
    provider.handler = answers_with_usage(honest)
    spent = (await balance(gateway))["spent"]
    _, headers = await post_json(gateway, completions, "/v1/completions")
    reserve = len(json.dumps(completions)) + 3 * 4 * 5
    assert headers["X-Credits-Balance"] == str(budget - int(spent) - reserve)


async def test_an_earlier_audio_answer_a_message_refers_to_is_reserved_like_a_media_part(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """`{"role": "assistant", "audio": {"id": ...}}` sends a previous audio answer back as input: a few bytes
    that cost that audio's tokens. It was reserved as its bytes only."""
    gateway = await start_with(ALL_PRICED)
    chat = {"model": "mock/chat", "max_tokens": 1, "messages": [
        {"role": "user", "content": "say it"}, {"role": "assistant", "audio": {"id": "audio_abc123"}},
        {"role": "user", "content": "again"}]}
    _, headers = await post_json(gateway, chat)
    assert headers["X-Credits-Balance"] == str(1_000_000 - (len(json.dumps(chat)) + MEDIA_PART_TOKENS + 1))


async def test_token_priced_image_models_reserve_their_output_cap_for_every_image(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """An image model billed in output tokens (its cap set in the catalogue) reserves the cap n times."""
    gateway = await start_with(budget_policy(1_000_000, {"mock/image": "{output_per_1k_tokens: 1000}"}),
                               model_caps={"mock/image": 100})
    _, headers = await post_json(gateway, {"model": "mock/image", "prompt": "cats", "n": 3}, "/v1/images/generations")
    assert headers["X-Credits-Balance"] == str(1_000_000 - 3 * 100)
