"""A stand-in for Bedrock Runtime's Converse API on loopback, speaking its real wire format.

It checks each call's SigV4 signature by recomputing it with botocore from the test credentials (a bad one gets
Bedrock's 403 `InvalidSignatureException`), answers `converse` with Converse JSON and `converse-stream` with AWS
event-stream framing (`application/vnd.amazon.eventstream`) built by a small encoder from the documented layout:
a prelude (total length, headers length, CRC32 of both), headers (name length, name, type 7 = string, value
length, value), the JSON payload, and a CRC32 of the whole message.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-west-2"
BAD_SIGNATURE = {"message": "The request signature we calculated does not match the signature you provided. "
                 "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."}

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude, string headers, payload, CRC32s (big-endian throughout)."""
    encoded = b"".join(
        struct.pack("!B", len(name)) + name.encode() + struct.pack("!BH", 7, len(value.encode())) + value.encode()
        for name, value in headers.items()
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event(kind: str, body: dict[str, Any]) -> bytes:
    # Bedrock pads each event's JSON with a `p` field (varying length) so sizes do not leak the content.
    payload = json.dumps({**body, "p": "abcdefghijklmnop"[: 3 + len(kind) % 9]}).encode()
    return frame({":event-type": kind, ":content-type": "application/json", ":message-type": "event"}, payload)


def exception(kind: str, message: str) -> bytes:
    return frame({":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
                 json.dumps({"message": message}).encode())


def text_events(tokens: tuple[str, ...], usage: tuple[int, int] | None, stop: str = "end_turn") -> list[bytes]:
    events = [event("messageStart", {"role": "assistant"})]
    events += [event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": t}}) for t in tokens]
    events += [event("contentBlockStop", {"contentBlockIndex": 0}), event("messageStop", {"stopReason": stop})]
    if usage is not None:
        events.append(event("metadata", {"usage": {"inputTokens": usage[0], "outputTokens": usage[1],
                                                   "totalTokens": sum(usage)}, "metrics": {"latencyMs": 120}}))
    return events


def error_response(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status,
                             headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"})


@dataclass
class Call:
    model_id: str
    operation: str  # converse or converse-stream
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class MockBedrock:
    """Default: answers "Hello from bedrock" in 4 tokens with usage (9 in, 4 out); `handler` scripts others."""

    tokens: tuple[str, ...] = ("Hello", " from", " bed", "rock")
    usage: tuple[int, int] = (9, 4)
    calls: list[Call] = field(default_factory=list)
    handler: Handler | None = None
    api_keys: tuple[str, ...] = ()  # Bedrock API keys accepted as `Authorization: Bearer <key>` instead of SigV4
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> "MockBedrock":
        app = web.Application()
        app.router.add_post("/model/{model_id}/{operation:converse|converse-stream}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer not in self.api_keys and not signature_is_valid(request, raw):
            return web.json_response(BAD_SIGNATURE, status=403, headers={"x-amzn-ErrorType": "InvalidSignatureException"})
        body = json.loads(raw)
        self.calls.append(Call(request.match_info["model_id"], request.match_info["operation"],
                               dict(request.headers), body))
        if self.handler is not None:
            return await self.handler(request, body)
        return await self.default(request, body)

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.match_info["operation"] == "converse":
            return web.json_response({
                "output": {"message": {"role": "assistant", "content": [{"text": "".join(self.tokens)}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": self.usage[0], "outputTokens": self.usage[1], "totalTokens": sum(self.usage)},
                "metrics": {"latencyMs": 321},
            })
        response = await open_event_stream(request)
        for message in text_events(self.tokens, self.usage):
            await response.write(message)
        return response


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream",
                                           "x-amzn-RequestId": "4c3e1a0e-0000-4000-8000-000000000000"})
    await response.prepare(request)
    return response


def signature_is_valid(request: web.Request, body: bytes) -> bool:
    """Recompute the SigV4 signature over the request as received (its signed headers, raw path, body, date)."""
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith("AWS4-HMAC-SHA256 "):
        return False
    fields = dict(part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 "):].split(","))
    signed = fields.get("SignedHeaders", "").split(";")
    credential = fields.get("Credential", "").split("/")
    if credential[0] != ACCESS_KEY or credential[2:4] != [REGION, "bedrock"]:
        return False
    headers = {name: request.headers.get(name, "") for name in signed}
    aws_request = AWSRequest(method="POST", url=f"http://{request.host}{request.raw_path}", data=body, headers=headers)
    aws_request.context["timestamp"] = request.headers.get("X-Amz-Date", "")
    auth = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "bedrock", REGION)
    expected = auth.signature(auth.string_to_sign(aws_request, auth.canonical_request(aws_request)), aws_request)
    return fields.get("Signature") == expected


async def wait_for(flag: asyncio.Event, seconds: float = 5.0) -> None:
    await asyncio.wait_for(flag.wait(), seconds)
