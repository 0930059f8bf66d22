"""The OpenAI wire format helpers the relay runs on every event: byte checks must agree with a JSON parse."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from proxy.policy.types import Usage
from proxy.upstream import body_usage, sse
from proxy.upstream.formats import openai as openai_format
from tests.mock_provider import chat_chunk, response_object, responses_events, responses_usage, usage_chunk


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


def test_responses_api_events_give_output_usage_and_end_from_their_bytes() -> None:
    events = responses_events("m", ("a", 'say "type":"response.completed" now'), (11, 2))
    kinds = [sse.event_json(e)["type"] for e in events]  # type: ignore[index]
    assert [kind for kind, e in zip(kinds, events) if openai_format.is_output_event(e)] == [
        "response.output_text.delta"] * 2
    assert [kind for kind, e in zip(kinds, events) if openai_format.ends_stream(e)] == ["response.completed"]
    assert [kind for kind, e in zip(kinds, events) if openai_format.may_carry_usage(e)] == ["response.completed"]
    usage = None
    for raw in events:
        usage = openai_format.event_usage(usage, raw)
    assert usage == Usage(input_tokens=11, output_tokens=2)
    # The JSON answer carries the Response's usage at its top level.
    answer = response_object("m", "completed", "ab", responses_usage(5, 3))
    assert openai_format.usage_of(answer) == Usage(input_tokens=5, output_tokens=3)
    assert openai_format.usage_in_tail(json.dumps(answer).encode()) == Usage(input_tokens=5, output_tokens=3)


def test_done_and_comments_are_neither() -> None:
    for raw in (b"data: [DONE]\n\n", b": ping\n\n"):
        assert not openai_format.is_output_event(raw)
        assert not openai_format.may_carry_usage(raw)


def test_usage_at_the_end_of_an_oversized_event_survives_the_splitter() -> None:
    content = "x" * 3_000_000
    raw = event({**chat_chunk(content), "usage": {"prompt_tokens": 11, "completion_tokens": 22}}, compact=True)
    splitter, pieces, usage = sse.EventSplitter(), [], None
    for start in range(0, len(raw), 7_000):
        for piece in splitter.feed(raw[start : start + 7_000]):
            pieces.append(piece)
            usage = openai_format.event_usage(usage, piece)
    assert b"".join(pieces) == raw and splitter.at_boundary
    assert max(len(p) for p in pieces) <= 1024 * 1024 + 7_000  # never held whole
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (11, 22)


@pytest.mark.parametrize("chunk_size", [997, 4096, 1 << 20])
def test_a_large_images_answer_counts_every_image_and_reads_the_usage_at_its_end(chunk_size: int) -> None:
    image = base64.b64encode(b"i" * 3_500_000).decode()
    answer = json.dumps({"created": 1, "data": [{"b64_json": image}] * 3,
                         "usage": {"input_tokens": 9, "output_tokens": 4000}}).encode()
    assert len(answer) > body_usage.MAX_WHOLE_JSON
    reader = body_usage.BodyUsage("application/json", openai_format)
    for start in range(0, len(answer), chunk_size):
        reader.feed(answer[start : start + chunk_size])
    assert reader.usage() == Usage(input_tokens=9, output_tokens=4000, images=3)


def test_wav_length_comes_from_its_header_and_the_bytes_received() -> None:
    rate, data = 8_000, b"\x01\x00" * 12_000  # 1.5 s of 16-bit mono
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    list_chunk = b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk before data: padded
    head = b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", 16) + fmt + list_chunk + b"data\xff\xff\xff\xff"
    assert body_usage.wav_seconds(head, len(head) + len(data)) == 1.5
    assert body_usage.wav_seconds(b"ID3\x04" + b"\x00" * 100, 5000) is None


@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_events_split_alike_wherever_the_chunks_break(ending: bytes) -> None:
    raw = b"data: one" + ending + b": ping" + ending + b"data: two\r\ndata: more" + ending
    whole = sse.EventSplitter().feed(raw)
    assert len(whole) == 3
    for cut in range(1, len(raw)):
        for second_cut in range(cut, len(raw)):
            splitter = sse.EventSplitter()
            parts = [raw[:cut], raw[cut:second_cut], raw[second_cut:]]
            assert [e for part in parts for e in splitter.feed(part)] == whole, (cut, second_cut)


def test_anthropic_usage_comes_from_message_start_then_message_delta() -> None:
    from proxy.upstream.formats import anthropic
    from tests.mock_anthropic import delta_event, end_events, start_events

    usage = {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "output_tokens": 7}
    seen = None
    for raw in start_events("m", usage):
        seen = anthropic.event_usage(seen, raw)
    assert seen == Usage(input_tokens=15, output_tokens=1, final=False)  # the input is known, the output is not
    text = delta_event('a "usage": {"input_tokens": 99} in the text')  # quoted inside a string: escaped
    assert anthropic.is_output_event(text) and not anthropic.may_carry_usage(text)
    for raw in end_events(usage):
        seen = anthropic.event_usage(seen, raw)
        assert not anthropic.is_output_event(raw)
    assert seen == Usage(input_tokens=15, output_tokens=7) and anthropic.ends_stream(end_events(usage)[-1])
    # Cumulative input figures in message_delta (newer API versions) count; broken figures change nothing.
    bigger = b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":20,"output_tokens":8}}\n\n'
    assert anthropic.event_usage(seen, bigger) == Usage(input_tokens=20, output_tokens=8)
    broken = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":-1}}\n\n'
    assert anthropic.event_usage(seen, broken) == seen
