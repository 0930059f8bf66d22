"""What every translated chat call does with a provider answer it cannot read: the gateway's 502, never a
traceback (a body nested past Python's stack once escaped the Bedrock translation as a RecursionError); and with
tool call arguments it cannot read: a 400."""

from __future__ import annotations

import pytest

from proxy.errors import ApiError
from proxy.upstream.formats import anthropic_translate, converse, gemini
from tests.mock_bedrock import frame

NESTED = b"[" * 100_000 + b"]" * 100_000  # past Python's recursion limit, well within a body's bytes
TRANSLATIONS = [anthropic_translate.ChatTranslation("m", False), gemini.ChatTranslation("m", False),
                converse.ChatTranslation("m", False)]


@pytest.mark.parametrize("translation", TRANSLATIONS, ids=["anthropic", "gemini", "bedrock"])
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000, b"not json", b"[1]", b""],
                         ids=["deep-array", "deep-object", "not-json", "array", "empty"])
def test_an_unreadable_answer_is_the_gateways_502(translation: object, body: bytes) -> None:
    with pytest.raises(ApiError) as failed:
        translation.answer(body)  # type: ignore[attr-defined]
    assert failed.value.status == 502 and failed.value.code == "upstream_error"


def test_a_bedrock_stream_event_nested_past_the_stack_is_the_gateways_502() -> None:
    stream = converse.ChatTranslation("m", False).stream()
    with pytest.raises(ApiError) as failed:
        stream.feed(frame({":event-type": "contentBlockDelta", ":message-type": "event"}, NESTED))
    assert failed.value.code == "upstream_error"


def test_a_bedrock_error_nested_past_the_stack_keeps_the_gateways_own_message() -> None:
    body = converse.error_body(400, "ValidationException", NESTED)
    assert body["error"]["message"] == "Bedrock answered 400 ValidationException"


@pytest.mark.parametrize("arguments", [NESTED.decode(), "[1]", '"text"', "{bad"])
def test_tool_call_arguments_that_are_no_json_object_are_a_400_for_bedrock(arguments: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": None, "tool_calls": [call]}]}
    with pytest.raises(ApiError) as refused:
        converse.to_converse(body, 100)
    assert refused.value.status == 400 and refused.value.details["param"] == "messages"
