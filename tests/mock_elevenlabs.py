"""A stand-in for ElevenLabs on loopback, speaking its real API: `xi-api-key`, text-to-speech streamed as audio
chunks with its `x-character-count` header, speech-to-text from a multipart `file` or `cloud_storage_url`, and its
error shapes (`{"detail": {"status", "message"}}`; a validation error's `detail` is a list, status 422)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .gateway_harness import PROVIDER_KEY
from .mock_provider import LoopbackMock, Received, Route, form_fields

VOICES = frozenset({"JBFqnCBsd6RMkjVDRZzb", "21m00Tcm4TlvDq8ikWAM"})
TTS_MODELS = frozenset({"eleven_multilingual_v2", "eleven_flash_v2_5"})
STT_MODELS = frozenset({"scribe_v1"})
AUDIO_CHUNKS = (b"ID3\x04\x00", b"\xff\xfb\x90\x00" * 64, b"\xff\xfb\x90\x44" * 64)  # an MP3's head and frames
WORDS = [  # the transcript of every file: three words, the last ending at 1.5 s
    {"text": "hello", "start": 0.1, "end": 0.5, "type": "word", "speaker_id": "speaker_0", "logprob": -0.1},
    {"text": " ", "start": 0.5, "end": 0.6, "type": "spacing", "speaker_id": "speaker_0", "logprob": 0.0},
    {"text": "world", "start": 0.6, "end": 1.5, "type": "word", "speaker_id": "speaker_0", "logprob": -0.2},
]


def refusal(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"detail": {"status": code, "message": message}}, status=status)


def invalid(field: str, message: str) -> web.Response:
    return web.json_response(
        {"detail": [{"type": "value_error", "loc": ["body", field], "msg": message, "input": None}]}, status=422
    )


@dataclass
class MockElevenLabs(LoopbackMock):
    """`character_count`: the figure its header states (None: the text's length, as ElevenLabs bills)."""

    character_count: int | None = None
    chunk_delay_s: float = 0.01
    after_first_chunk: asyncio.Event | None = None  # set: the rest of the audio waits for it (a streaming check)

    def routes(self) -> dict[str, Route]:
        return {"/v1/text-to-speech/{voice_id}/stream": self.speak, "/v1/text-to-speech/{voice_id}": self.speak,
                "/v1/speech-to-text": self.transcribe}

    async def speak(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("xi-api-key") != PROVIDER_KEY:
            return refusal(401, "invalid_api_key", "Invalid API key")
        body = await self.record(request)
        if not isinstance(body.get("text"), str) or not body["text"]:
            return invalid("text", "Field required")
        if body.get("model_id") not in TTS_MODELS:
            return invalid("model_id", f"A model with model ID {body.get('model_id')} does not exist")
        if request.match_info["voice_id"] not in VOICES:
            return refusal(404, "voice_not_found", "A voice with the voice_id was not found.")
        count = len(body["text"]) if self.character_count is None else self.character_count
        response = web.StreamResponse(headers={
            "Content-Type": "audio/mpeg", "x-character-count": str(count), "request-id": "req_mock_1",
        })
        await response.prepare(request)
        for i, chunk in enumerate(AUDIO_CHUNKS):
            await response.write(chunk)
            if i == 0 and self.after_first_chunk is not None:
                await asyncio.wait_for(self.after_first_chunk.wait(), 5)
            await asyncio.sleep(self.chunk_delay_s)
        await response.write_eof()
        return response

    async def transcribe(self, request: web.Request) -> web.Response:
        if request.headers.get("xi-api-key") != PROVIDER_KEY:
            return refusal(401, "invalid_api_key", "Invalid API key")
        if request.content_type != "multipart/form-data":
            return invalid("file", "Expected multipart/form-data")
        fields: dict[str, Any] = await form_fields(request)
        self.received.append(Received(request.path, dict(request.headers), fields, dict(request.query)))
        if fields.get("model_id") not in STT_MODELS:
            return invalid("model_id", "model_id must be scribe_v1")
        if ("file" in fields) == ("cloud_storage_url" in fields):
            return refusal(400, "invalid_parameters", "Exactly one of file or cloud_storage_url must be provided.")
        return web.json_response({"language_code": "eng", "language_probability": 0.98, "text": "hello world",
                                  "words": WORDS, "transcription_id": "tr_mock_1"})

    def audio(self) -> bytes:
        return b"".join(AUDIO_CHUNKS)
