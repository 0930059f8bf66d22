"""Media through `POST /v1/responses`: ElevenLabs text-to-speech and speech-to-text (a loopback mock speaking its
real API), OpenAI-format speech2text and image2image from an upload; billed in the provider's units (characters,
seconds of audio) to the credit; hostile media inputs refused as JSON errors before anything is reserved."""

from __future__ import annotations

import asyncio
import errno
import io
import wave
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy.assets.rehost import PublicResolver, is_public

from .gateway_harness import TEST_KEY, gateway_config, start_gateway, write_policy
from .mock_elevenlabs import MockElevenLabs
from .mock_provider import MockProvider, UploadedFile
from .test_responses import balance, error_of, generate

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
POLICY = """
plans:
  demo:
    models: ["mock/*", "el/*"]
    budget: {credits: 100000, period: month, scope: account}
prices:
  "mock/*": {per_request: 1}
  "el/*": {per_request: 1}
  el/tts: {per_request: 1, per_character: 2}
  el/stt: {per_request: 1, per_second: 3}
  mock/transcribe: {per_request: 1, per_second: 3}
defaults:
  max_seconds: 60s
"""
VOICE = "21m00Tcm4TlvDq8ikWAM"


def _model(model_id: str, capability: str, provider: str, upstream: str) -> dict[str, str]:
    return {"id": model_id, "name": model_id, "creator": "Tests", "capability": capability, "provider": provider,
            "upstream_model": upstream}


@pytest.fixture
async def elevenlabs() -> AsyncIterator[MockElevenLabs]:
    mock = await MockElevenLabs().start()
    yield mock
    await mock.stop()


@pytest.fixture
async def gateway(
    provider: MockProvider, elevenlabs: MockElevenLabs, tmp_path: Path, gateway_env: None
) -> AsyncIterator[str]:
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY))
    config["providers"]["eleven"] = {"kind": "elevenlabs", "base_url": elevenlabs.url,
                                     "api_key_env": "MOCK_PROVIDER_KEY"}
    config["providers"]["eleven-badkey"] = {"kind": "elevenlabs", "base_url": elevenlabs.url,
                                            "api_key_env": "EDGE_PROXY_DEMO_KEY"}  # a key ElevenLabs refuses
    config["models"] += [
        _model("el/tts", "text2speech", "eleven", "eleven_multilingual_v2"),
        _model("el/stt", "speech2text", "eleven", "scribe_v1"),
        _model("el/tts-unknown", "text2speech", "eleven", "eleven_v9"),
        _model("el/tts-badkey", "text2speech", "eleven-badkey", "eleven_multilingual_v2"),
        _model("mock/transcribe", "speech2text", "mock", "whisper-1"),
        _model("mock/edit", "image2image", "mock", "gpt-image-1"),
    ]
    server = await start_gateway(config)
    yield server.url
    await server.stop()


def wav(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit PCM WAV of silence, `seconds` long."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(b"\x00\x00" * int(seconds * rate))
    return out.getvalue()


async def upload(gateway: str, data: bytes, content_type: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/uploads", data=data, headers={**AUTH, "Content-Type": content_type}) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["url"])


async def test_elevenlabs_speech_streams_into_an_asset_billed_by_its_character_count(
    gateway: str, elevenlabs: MockElevenLabs
) -> None:
    text = "Hello from the gateway"
    _, events = await generate(gateway, {"model": "el/tts", "input": text, "voice": VOICE})
    name, data = events[-1]
    assert name == "generation.completed" and data["output"]["content_type"] == "audio/mpeg"
    async with aiohttp.ClientSession() as http, http.get(data["output"]["url"]) as r:
        assert await r.read() == elevenlabs.audio()
    sent = elevenlabs.received[-1]
    assert sent.path == f"/v1/text-to-speech/{VOICE}/stream" and sent.query == {"output_format": "mp3_44100_128"}
    assert sent.body == {"text": text, "model_id": "eleven_multilingual_v2"}
    assert sent.headers["xi-api-key"] == "provider-secret-123" and "Authorization" not in sent.headers
    assert (await balance(gateway)) == {**(await balance(gateway)), "spent": 1 + 2 * len(text), "held": 0}

    elevenlabs.character_count = 5  # settled on what ElevenLabs states it billed, not on the reserve
    before = (await balance(gateway))["spent"]
    _, events = await generate(gateway, {"model": "el/tts", "input": text})  # the default voice
    assert events[-1][0] == "generation.completed"
    assert elevenlabs.received[-1].path == "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream"
    assert (await balance(gateway))["spent"] - before == 1 + 2 * 5


@pytest.mark.parametrize(("model", "upstream_status"), [("el/tts-badkey", 401), ("el/tts-unknown", 422)])
async def test_elevenlabs_refusals_fail_the_generation_and_cost_nothing(
    gateway: str, model: str, upstream_status: int
) -> None:
    _, events = await generate(gateway, {"model": model, "input": "hi"})
    name, data = events[-1]
    assert name == "generation.failed" and data["error"]["upstream_status"] == upstream_status
    assert data["error"]["code"] == "upstream_error" and "detail" in data["error"]["upstream_message"]
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (0, 0)


async def test_elevenlabs_transcribes_an_upload_billed_by_the_seconds_of_audio(
    gateway: str, elevenlabs: MockElevenLabs
) -> None:
    audio = wav(2.0)
    url = await upload(gateway, audio, "audio/wav")
    _, events = await generate(gateway, {"model": "el/stt", "audio_url": url})
    assert events[-1] == ("generation.completed", {"output": {"text": "hello world", "language": "eng"}})
    sent = elevenlabs.received[-1].body
    assert sent["model_id"] == "scribe_v1" and "cloud_storage_url" not in sent
    assert sent["file"] == UploadedFile("audio.wav", "audio/wav", audio)
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (1 + 3 * 1.5, 0)  # the transcript's last word ends at 1.5 s


async def test_elevenlabs_fetches_an_https_audio_url_itself(gateway: str, elevenlabs: MockElevenLabs) -> None:
    url = "https://media.example.com/interview.mp3?signature=abc"
    _, events = await generate(gateway, {"model": "el/stt", "audio_url": url})
    assert events[-1][0] == "generation.completed"
    sent = elevenlabs.received[-1].body
    assert sent == {"cloud_storage_url": url, "model_id": "scribe_v1"}


async def test_openai_format_transcription_and_image_edit_from_uploads(gateway: str, provider: MockProvider) -> None:
    audio = wav(4.0)  # bounds the reserve: 1 + 3 * 4
    _, events = await generate(gateway, {"model": "mock/transcribe", "audio_url": await upload(gateway, audio, "audio/wav")})
    assert events[-1] == ("generation.completed", {"output": {"text": "hello from the upload"}})
    sent = provider.received[-1]
    assert sent.path == "/v1/audio/transcriptions" and sent.headers["Content-Type"].startswith("multipart/form-data")
    assert sent.body == {"model": "whisper-1", "file": UploadedFile("audio.wav", "audio/wav", audio)}
    assert (await balance(gateway))["spent"] == 1 + 3 * 3  # whisper's usage: 3 seconds

    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    image_url = await upload(gateway, png, "image/png")
    _, events = await generate(gateway, {"model": "mock/edit", "prompt": "add a hat", "image_url": image_url,
                                         "aspect_ratio": "16:9"})
    assert events[-1] == ("generation.completed", {"output": {"url": "http://127.0.0.1/edited.png",
                                                              "urls": ["http://127.0.0.1/edited.png"]}})
    sent = provider.received[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.body == {"model": "gpt-image-1", "prompt": "add a hat", "size": "1536x1024",
                         "image": UploadedFile("image.png", "image/png", png)}

    jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 32  # several images, the seeds' `image_urls`: OpenAI's `image[]` parts
    urls = [image_url, await upload(gateway, jpeg, "image/jpeg")]
    _, events = await generate(gateway, {"model": "mock/edit", "prompt": "merge", "image_urls": urls})
    assert events[-1][0] == "generation.completed"
    assert provider.received[-1].body["image[]"] == [UploadedFile("image.png", "image/png", png),
                                                     UploadedFile("image.jpg", "image/jpeg", jpeg)]


async def test_a_presigned_upload_is_an_image_url_for_image2image(gateway: str, provider: MockProvider) -> None:
    """The seeds' flow: POST /v1/uploads for a presigned PUT, PUT the file, then its asset_url as `image_url`."""
    png = b"\x89PNG\r\n\x1a\n" + b"\x01" * 48
    async with aiohttp.ClientSession() as http:
        offer_body = {"filename": "cat.png", "content_type": "image/png", "size": len(png)}
        async with http.post(f"{gateway}/v1/uploads", json=offer_body, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            offer = await r.json()
        async with http.put(offer["upload_url"], data=png, headers=offer["headers"]) as r:
            assert r.status == 200, await r.text()
    _, events = await generate(gateway, {"model": "mock/edit", "prompt": "add a hat", "image_url": offer["asset_url"]})
    assert events[-1][0] == "generation.completed", events
    sent = provider.received[-1]
    assert sent.path == "/v1/images/edits" and sent.body["image"] == UploadedFile("image.png", "image/png", png)
    assert (await balance(gateway))["held"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "el/stt", "audio_url": 5}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "not a url"}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "http://media.example.com/a.mp3"}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "https://user:pw@media.example.com/a.mp3"}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "https://127.0.0.1/a.mp3"}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "https://[::ffff:10.0.0.1]/a.mp3"}, 400, "invalid_request", "audio_url"),
        ({"model": "el/stt", "audio_url": "https://169.254.169.254/latest/meta-data"}, 400, "invalid_request", "audio_url"),
        ({"model": "mock/transcribe", "audio_url": "https://localhost/a.wav"}, 400, "invalid_request", "audio_url"),
        ({"model": "mock/transcribe", "audio_url": "{gateway}/v1/assets/unsigned"}, 403, "invalid_asset_signature",
         "audio_url"),
        ({"model": "mock/transcribe", "audio_url": "{image}0"}, 403, "invalid_asset_signature", "audio_url"),
        ({"model": "el/tts", "input": "hi", "voice": "../../v1/user"}, 400, "invalid_request", "voice"),
        ({"model": "el/tts", "input": ["hi"]}, 400, "invalid_request", "input"),
        ({"model": "mock/edit", "prompt": "x", "image_url": "{image}"}, 415, "unsupported_media_type", "image_url"),
        ({"model": "mock/edit", "prompt": "x"}, 400, "invalid_request", "image_urls"),
        ({"model": "mock/edit", "prompt": "x", "image_url": "{image}", "image_urls": ["{image}"]}, 400,
         "invalid_request", "image_urls"),
        ({"model": "mock/edit", "prompt": "x", "image_urls": []}, 400, "invalid_request", "image_urls"),
        ({"model": "mock/edit", "prompt": "x", "image_urls": [7]}, 400, "invalid_request", "image_urls"),
        ({"model": "mock/edit", "prompt": "x", "image_urls": ["https://10.0.0.8/a.png"]}, 400, "invalid_request",
         "image_urls"),
    ],
)
async def test_hostile_media_inputs_are_json_errors_before_anything_is_reserved(
    gateway: str, provider: MockProvider, elevenlabs: MockElevenLabs,
    body: dict[str, Any], status: int, code: str, param: str,
) -> None:
    audio_url = await upload(gateway, wav(0.1), "audio/wav")  # an audio file is no image
    body = {k: [audio_url] if v == ["{image}"] else v for k, v in body.items()}
    body = {k: v.format(gateway=gateway, image=audio_url) if isinstance(v, str) else v for k, v in body.items()}
    got, error = await error_of(gateway, body)
    assert (got, error["code"], error["param"]) == (status, code, param), error
    assert provider.received == [] and elevenlabs.received == []
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (0, 0)


async def test_a_non_canonical_ip_host_is_refused_as_a_bad_url_not_a_timeout(gateway: str) -> None:
    for host in ("2130706433", "127.1", "0177.0.0.1"):  # 127.0.0.1 spelled as aiohttp will not dial it
        got, error = await error_of(gateway, {"model": "mock/edit", "prompt": "x", "image_url": f"https://{host}/a.png"})
        assert (got, error["code"], error["param"]) == (400, "invalid_request", "image_url"), error
        assert "not a URL that can be fetched" in error["message"], error


async def test_only_public_addresses_are_fetched_from() -> None:
    assert is_public("93.184.216.34") and is_public("2606:4700::1111")
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "::1", "fe80::1%eth0", "fd00::1", "::ffff:127.0.0.1"):
        assert not is_public(address), address
    with pytest.raises(OSError) as refused:
        await PublicResolver(frozenset()).resolve("localhost", 443)
    assert refused.value.errno == errno.EACCES


async def test_native_elevenlabs_speech_streams_through_unbuffered_and_is_billed_by_characters(
    gateway: str, elevenlabs: MockElevenLabs
) -> None:
    elevenlabs.after_first_chunk = released = asyncio.Event()
    text = "Streamed speech"
    headers = {"xi-api-key": TEST_KEY}  # as an ElevenLabs SDK sends its key
    async with aiohttp.ClientSession() as http:
        url = f"{gateway}/elevenlabs/v1/text-to-speech/{VOICE}/stream?output_format=mp3_22050_32"
        async with http.post(url, json={"text": text, "model_id": "el/tts"}, headers=headers) as r:
            assert (r.status, r.content_type) == (200, "audio/mpeg")
            assert r.headers["x-character-count"] == str(len(text))
            first = await asyncio.wait_for(r.content.readany(), 5)  # before the provider sends the rest
            released.set()
            audio = first + await r.read()
    assert audio == elevenlabs.audio()
    sent = elevenlabs.received[-1]
    assert sent.body == {"text": text, "model_id": "eleven_multilingual_v2"}
    assert sent.query == {"output_format": "mp3_22050_32"} and sent.headers["xi-api-key"] == "provider-secret-123"
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (1 + 2 * len(text), 0)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        (f"/elevenlabs/v1/text-to-speech/{VOICE}", {"text": "hi", "model_id": "el/tts"}, {}, 401,
         "missing_credentials"),
        (f"/elevenlabs/v1/text-to-speech/{VOICE}", {"text": "", "model_id": "el/tts"}, None, 400, "invalid_request"),
        (f"/elevenlabs/v1/text-to-speech/{VOICE}", {"text": "hi"}, None, 400, "invalid_request"),
        (f"/elevenlabs/v1/text-to-speech/{VOICE}", {"text": "hi", "model_id": "mock/speech"}, None, 400,
         "invalid_request"),
        (f"/elevenlabs/v1/text-to-speech/{VOICE}?output_format=mp3%26x%3D1", {"text": "hi", "model_id": "el/tts"},
         None, 400, "invalid_request"),
        ("/elevenlabs/v1/text-to-speech/bad%20voice/stream", {"text": "hi", "model_id": "el/tts"}, None, 400,
         "invalid_request"),
        (f"/elevenlabs/v1/text-to-speech/{VOICE}", {"text": "hi", "model_id": "el/none"}, None, 404,
         "model_not_found"),
    ],
)
async def test_native_elevenlabs_refusals_are_in_elevenlabs_error_shape(
    gateway: str, elevenlabs: MockElevenLabs, path: str, body: dict[str, Any], headers: dict[str, str] | None,
    status: int, code: str,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway + path, json=body, headers={"xi-api-key": TEST_KEY} if headers is None else headers) as r:
            answer = await r.json()
    assert (r.status, answer["detail"]["status"]) == (status, code) and answer["detail"]["message"]
    assert elevenlabs.received == []


async def test_native_elevenlabs_relays_the_providers_own_refusal_and_charges_nothing(
    gateway: str, elevenlabs: MockElevenLabs
) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{gateway}/elevenlabs/v1/text-to-speech/unknownvoice"
        async with http.post(url, json={"text": "hi", "model_id": "el/tts"}, headers={"xi-api-key": TEST_KEY}) as r:
            assert (r.status, (await r.json())["detail"]["status"]) == (404, "voice_not_found")
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (0, 0)
