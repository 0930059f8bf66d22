"""Model input schemas with the form hints the seeds' clients render (`x-property-order`, `x-imgly-enum-labels`,
...): served on both schema routes from config, with a default order; hints that do not fit the inputs are config
errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy.config import ConfigError, parse_config

from .gateway_harness import TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
HINTS = {
    "property_order": ["prompt", "aspect_ratio"],
    "properties": {
        "prompt": {"title": "Prompt", "builder": {"component": "TextArea"}},
        "aspect_ratio": {"title": "Format", "enum_labels": {"1:1": "Square", "16:9": "Landscape"},
                         "enum_icons": {"16:9": "ratio16by9"}},
    },
}


def _with_hints(config: dict[str, Any], model_id: str, hints: dict[str, Any]) -> dict[str, Any]:
    config["models"] = [{**m, "schema_hints": hints} if m["id"] == model_id else m for m in config["models"]]
    return config


@pytest.fixture
async def gateway(provider: MockProvider, policies_dir: Path, gateway_env: None) -> AsyncIterator[str]:
    server = await start_gateway(_with_hints(gateway_config(provider.url, policies_dir), "mock/image", HINTS))
    yield server.url
    await server.stop()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_hints_from_config_are_served_on_both_schema_routes(gateway: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        status, seeds = await _get(http, f"{gateway}/v1/models/schema?model=mock/image")
        assert status == 200
        status, doc = await _get(http, f"{gateway}/v1/models/mock/image/schema")
        assert status == 200
        status, plain = await _get(http, f"{gateway}/v1/models/schema?model=mock/chat")
    schema = seeds["input_schema"]
    assert (seeds["model"], seeds["capability"]) == ("mock/image", "text2image")
    assert doc["components"]["schemas"]["Input"] == schema
    assert schema["x-property-order"] == ["prompt", "aspect_ratio"]  # `n` hidden from the form, still accepted
    aspect = schema["properties"]["aspect_ratio"]
    assert aspect["x-imgly-enum-labels"] == {"1:1": "Square", "16:9": "Landscape"}
    assert aspect["x-imgly-enum-icons"] == {"16:9": "ratio16by9"} and aspect["title"] == "Format"
    assert aspect["enum"] == ["1:1", "16:9", "9:16", "4:3", "3:4"]  # hints never change what is accepted
    assert schema["properties"]["prompt"]["x-imgly-builder"] == {"component": "TextArea"}
    # Without hints: every input, in the schema's order, and no x-imgly keywords.
    assert plain["input_schema"]["x-property-order"] == ["prompt", "max_tokens", "temperature"]
    assert not any(key.startswith("x-") for rule in plain["input_schema"]["properties"].values() for key in rule)


@pytest.mark.parametrize("query", ["", "?model=", "?model=mock/image&model=mock/chat"])
async def test_the_query_form_needs_one_model(gateway: str, query: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        status, answer = await _get(http, f"{gateway}/v1/models/schema{query}")
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_request", "model")


async def test_the_query_form_answers_unknown_models_and_callers_like_the_others(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        status, answer = await _get(http, f"{gateway}/v1/models/schema?model=mock/image")
        assert (status, answer["error"]["code"]) == (401, "missing_credentials")
        http.headers.update(AUTH)
        status, answer = await _get(http, f"{gateway}/v1/models/schema?model=none/such")
        assert (status, answer["error"]["code"]) == (404, "model_not_found")


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        ({"property_order": ["prompt", "style"]}, "schema_hints names 'style', which is not an input"),
        ({"property_order": ["aspect_ratio"]}, "leaves out required input 'prompt'"),
        ({"property_order": ["prompt", "prompt"]}, "lists an input twice"),
        ({"properties": {"aspect_ratio": {"enum_labels": {"2:1": "Wide"}}}}, "'2:1' is not a value of aspect_ratio"),
        ({"properties": {"n": {"enum_icons": {"1": "one"}}}}, "is not a value of n"),
        ({"properties": {"prompt": {"colour": "red"}}}, "colour: unknown key"),
        ({"properties": {"prompt": {"title": ""}}}, "title"),
    ],
)
def test_hints_that_do_not_fit_the_inputs_are_config_errors(hints: dict[str, Any], expected: str) -> None:
    config = _with_hints(gateway_config("http://127.0.0.1:9", Path("policies")), "mock/image", hints)
    with pytest.raises(ConfigError) as error:
        parse_config(config, "conf/gateway.yaml")
    assert str(error.value).startswith("conf/gateway.yaml:") and "models.2" in str(error.value)
    assert expected in str(error.value)
