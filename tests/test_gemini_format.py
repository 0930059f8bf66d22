"""The Gemini wire format's pure parts: usage from answers and events, addressing, body preparation, errors."""

from __future__ import annotations

import json

import pytest

from proxy.errors import ApiError
from proxy.policy.types import Usage
from proxy.upstream.formats import gemini
from tests.mock_gemini import USAGE, event, last_event, response, text_event

FINAL = Usage(input_tokens=25, output_tokens=15)  # USAGE: prompt + tool-use prompt, candidates + thoughts


def test_a_json_answer_charges_prompt_and_tool_prompt_as_input_candidates_and_thoughts_as_output() -> None:
    assert gemini.usage_of(response("m", [{"text": "hi"}], USAGE)) == FINAL
    assert gemini.usage_of({"totalTokens": 7}) == Usage()  # countTokens: nothing generated
    assert gemini.usage_of({"candidates": []}) is None


@pytest.mark.parametrize("broken", [{"promptTokenCount": "21"}, {"promptTokenCount": -1}, {"thoughtsTokenCount": 1.5},
                                    {"candidatesTokenCount": 10**400}, {"totalTokenCount": 5}, {}])
def test_broken_or_empty_figures_count_as_absent(broken: dict[str, object]) -> None:
    assert gemini.usage_of({"usageMetadata": broken}) is None


def test_stream_usage_is_running_until_the_chunk_with_a_finish_reason() -> None:
    first = text_event("m", "Hel")
    assert gemini.may_carry_usage(first) and gemini.is_output_event(first) and not gemini.ends_stream(first)
    running = gemini.event_usage(None, first)
    assert running == Usage(input_tokens=21, final=False)
    last = last_event("m", "lo")
    assert gemini.ends_stream(last)
    assert gemini.event_usage(running, last) == FINAL
    # An event without usage keeps what was known.
    assert gemini.event_usage(running, event({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})) == running


def test_generated_text_spelling_usage_or_a_finish_reason_is_not_mistaken_for_them() -> None:
    spelled = text_event("m", '"usageMetadata": {"promptTokenCount": 9}, "finishReason": "STOP"')
    assert gemini.event_usage(None, spelled) == Usage(input_tokens=21, final=False)
    assert not gemini.ends_stream(spelled)


def test_usage_is_read_from_the_tail_of_an_answer_too_large_to_parse() -> None:
    whole = json.dumps(response("m", [{"text": "x" * 1000}], USAGE)).encode()
    assert gemini.usage_in_tail(whole[-300:]) == FINAL
    assert gemini.usage_in_tail(whole[:-300]) is None


def test_urls_and_credentials() -> None:
    base = "https://generativelanguage.googleapis.com/v1beta"
    assert gemini.url(base, gemini.GENERATE, "gemini-2.5-flash", False) == f"{base}/models/gemini-2.5-flash:generateContent"
    assert gemini.url(base, gemini.STREAM, "models/g", True) == f"{base}/models/g:streamGenerateContent?alt=sse"
    assert gemini.url(base, gemini.COUNT_TOKENS, "g", False) == f"{base}/models/g:countTokens"
    assert gemini.credential_headers("k", None, None) == {"x-goog-api-key": "k"}
    assert gemini.credential_headers("k", "Authorization", "Bearer") == {"Authorization": "Bearer k"}


def test_prepare_caps_the_output_and_names_the_upstream_model_where_the_body_does() -> None:
    asked = {"contents": [], "generationConfig": {"maxOutputTokens": 900, "temperature": 1}}
    prepared = gemini.prepare(gemini.STREAM, asked, "up", 500)
    assert json.loads(prepared.body)["generationConfig"] == {"maxOutputTokens": 500, "temperature": 1}
    assert prepared.stream and not prepared.usage_injected
    assert json.loads(gemini.prepare(gemini.GENERATE, {"contents": []}, "up", 64).body) == {
        "contents": [], "generationConfig": {"maxOutputTokens": 64}}
    nested = {"generateContentRequest": {"model": "models/google/gemini", "contents": []}}
    assert json.loads(gemini.prepare(gemini.COUNT_TOKENS, nested, "up", 0).body) == {
        "generateContentRequest": {"model": "models/up", "contents": []}}


def test_gateway_errors_are_in_googles_shape_with_our_code_as_the_reason() -> None:
    body = gemini.error_body(ApiError("rate_limit", "slow down", param="x"))
    assert body == {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED", "details": [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "rate_limit", "domain": "edge-proxy",
        "metadata": {"param": "x"}}]}}
    assert gemini.error_event(ApiError("upstream_error", "broke")).startswith(b'data: {"error":')
