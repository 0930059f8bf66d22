"""ElevenLabs (kind `elevenlabs`): speech. The module is the adapter (formats.base.WireFormat).

- URL: `<base_url><route>` with `base_url: https://api.elevenlabs.io`; the routes are ElevenLabs' own:
  `/v1/text-to-speech/<voice_id>/stream?output_format=...` (JSON `{"text", "model_id"}`, the audio streamed back)
  and `/v1/speech-to-text` (multipart: `model_id` and `file` or `cloud_storage_url`; JSON transcript back).
- Credential: `xi-api-key: <key>`.
- Usage: text-to-speech is billed in characters, which ElevenLabs states in its `x-character-count` header;
  speech-to-text in seconds of audio, read from the transcript's word timings (the last word's `end`).
- Errors: `{"detail": {"status": "<code>", "message": "..."}}` (a validation error's `detail` is a list).
"""

from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import quote

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from .base import SSE_PING, PreparedBody, audio_seconds, multipart_body, no_injected_usage_event

dialect = "elevenlabs"
keepalive = SSE_PING  # never used: ElevenLabs answers audio or JSON, no event streams
example_base_url = "https://api.elevenlabs.io"

SPEECH_TO_TEXT_ROUTE = "/v1/speech-to-text"
OUTPUT_FORMAT = "mp3_44100_128"  # ElevenLabs' default; every plan may ask for it
CHARACTER_COUNT_HEADER = "x-character-count"
MAX_CHARACTERS = 2**31 - 1


_VOICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # voice ids go into the URL path
_OUTPUT_FORMATS = re.compile(r"[a-z0-9_]{1,32}")  # mp3_44100_128, pcm_16000, ulaw_8000, ...


def speech_route(voice_id: str, output_format: str = OUTPUT_FORMAT, stream: bool = True) -> str:
    """The text-to-speech route of a voice; a voice id or output format that could change the URL is a 400."""
    if not _VOICE_ID.fullmatch(voice_id):
        raise ApiError("invalid_request", "the voice must be an ElevenLabs voice id (letters, digits, _ and -)",
                       param="voice")
    if not _OUTPUT_FORMATS.fullmatch(output_format):
        raise ApiError("invalid_request", "output_format must be one of ElevenLabs' formats, e.g. mp3_44100_128",
                       param="output_format")
    return f"/v1/text-to-speech/{quote(voice_id, safe='')}{'/stream' if stream else ''}?output_format={output_format}"


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    return base_url + route


def credential_headers(credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
    """`xi-api-key: <key>` unless the config names another header or a scheme."""
    return {header or "xi-api-key": f"{scheme} {credential}" if scheme else credential}


def prepare(route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
    """`model_id` is the upstream model; speech-to-text goes as multipart, text-to-speech as JSON."""
    out = dict(body, model_id=upstream_model)
    if route == SPEECH_TO_TEXT_ROUTE:
        return multipart_body(out)
    return PreparedBody(sse.compact_json(out), stream=False, usage_injected=False)


def character_usage(headers: Mapping[str, str]) -> Usage | None:
    """The characters a text-to-speech answer was billed, from its `x-character-count` header; None without it."""
    count = headers.get(CHARACTER_COUNT_HEADER, "")
    if not count.isdigit() or int(count) > MAX_CHARACTERS:
        return None
    return Usage(characters=int(count))


def usage_of(answer: dict[str, Any]) -> Usage | None:
    """A transcript's audio length: the latest word `end` (seconds); None without timed words."""
    words = answer.get("words")
    ends = [audio_seconds(word.get("end")) for word in words if isinstance(word, dict)] if isinstance(words, list) else []
    timed = [end for end in ends if end is not None]
    return Usage(seconds=max(timed)) if timed else None


def usage_in_tail(data: bytes) -> Usage | None:
    return None  # transcripts are parsed whole; audio carries none


def event_usage(previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
    return previous


def may_carry_usage(event: bytes) -> bool:
    return False


def is_output_event(event: bytes) -> bool:
    return False


def ends_stream(event: bytes) -> bool:
    return False


is_injected_usage_event = no_injected_usage_event


def error_body(error: ApiError) -> dict[str, Any]:
    """A gateway error in ElevenLabs' shape, our stable code as its `status`."""
    return {"detail": {"status": error.code, "message": error.message, **error.details}}


def error_event(error: ApiError) -> bytes:
    return sse.data_event(error_body(error))
