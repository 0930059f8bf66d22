"""The OpenAI wire format helpers the relay runs on every event: byte checks must agree with a JSON parse."""

from __future__ import annotations

import json

import pytest

from proxy.upstream import openai_format, sse
from tests.mock_provider import chat_chunk, usage_chunk


def event(payload: dict, *, compact: bool) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"


@pytest.mark.parametrize("compact", [True, False])
def test_usage_event_is_recognised_in_either_spacing(compact: bool) -> None:
    raw = event(usage_chunk(3, 5), compact=compact)
    assert openai_format.may_carry_usage(raw)
    assert not openai_format.is_output_event(raw)
    parsed = sse.event_json(raw)
    assert parsed is not None and openai_format.usage_of(parsed) is not None


@pytest.mark.parametrize("compact", [True, False])
def test_content_chunk_counts_as_output_and_is_not_parsed_for_usage(compact: bool) -> None:
    raw = event(chat_chunk("hello", with_null_usage=True), compact=compact)
    assert openai_format.is_output_event(raw)
    assert not openai_format.may_carry_usage(raw)


def test_generated_text_that_spells_a_usage_object_is_not_mistaken_for_one() -> None:
    raw = event(chat_chunk('{"usage": {"prompt_tokens": 1}, "choices": [{}]}'), compact=True)
    assert not openai_format.may_carry_usage(raw)
    assert openai_format.is_output_event(raw)


def test_done_and_comments_are_neither() -> None:
    for raw in (b"data: [DONE]\n\n", b": ping\n\n"):
        assert not openai_format.is_output_event(raw)
        assert not openai_format.may_carry_usage(raw)
