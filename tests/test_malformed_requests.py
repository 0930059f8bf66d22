"""Requests aiohttp's parser refuses before any handler runs: JSON catalogue errors, no echo, no credential logged."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from proxy.server import RefusalLog

from .test_metrics_e2e import samples, total
from .gateway_harness import gateway_config, gateway_process
from .mock_provider import MockProvider

SECRET = "sk_secret_" + "s" * 30
PAD = "x" * 9000  # over aiohttp's 8190-byte max_field_size and max_line_size

# (name, raw request, expected status, expected code)
MALFORMED = [
    ("bad request line", f"GET /v1/me HTTP/9.x\r\nHost: a\r\nAuthorization: Bearer {SECRET}\r\n\r\n",
     400, "invalid_request"),
    ("bad header value", f"GET /v1/me HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n",
     400, "invalid_request"),
    ("header line without colon", f"GET /v1/me HTTP/1.1\r\nHost: a\r\nAuthorization Bearer {SECRET}\r\n\r\n",
     400, "invalid_request"),
    ("oversized credential", f"GET /v1/me HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}{PAD}\r\n\r\n",
     431, "headers_too_large"),
    ("oversized header after the credential",
     f"GET /v1/me HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}\r\nX-Pad: {SECRET}{PAD}\r\n\r\n",
     431, "headers_too_large"),
    ("too many headers",
     f"GET /v1/me HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {SECRET}\r\n"
     + "".join(f"X-H{i}: {SECRET}\r\n" for i in range(200)) + "\r\n",
     431, "headers_too_large"),
    ("oversized request line", f"GET /v1/me?key={SECRET}{PAD} HTTP/1.1\r\nHost: a\r\n\r\n", 431, "headers_too_large"),
]


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


async def send_raw(url: str, raw: str) -> RawAnswer:
    """Write `raw` as is and read the answer until the gateway closes the connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(raw.encode("latin-1"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return RawAnswer(int(status_line.split()[1]), headers, body)


def assert_catalogue_error(answer: RawAnswer, status: int, code: str) -> None:
    assert (answer.status, answer.headers["content-type"].split(";")[0]) == (status, "application/json")
    assert (answer.error()["code"], int(answer.headers["content-length"])) == (code, len(answer.body))
    assert SECRET not in answer.body.decode("latin-1") and "Bearer" not in answer.body.decode("latin-1")
    assert answer.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(("name", "raw", "status", "code"), MALFORMED, ids=[case[0] for case in MALFORMED])
async def test_malformed_request_gets_a_json_error_that_echoes_nothing(
    gateway: str, name: str, raw: str, status: int, code: str
) -> None:
    assert_catalogue_error(await send_raw(gateway, raw), status, code)


async def test_malformed_requests_log_one_warning_without_content_or_traceback(
    gateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        for _, raw, status, code in MALFORMED:
            assert (await send_raw(gateway, raw)).status == status
    assert not [r for r in caplog.records if SECRET in r.getMessage() or "sk_secret" in repr(r.__dict__)]
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]  # rate-limited: one line a minute
    assert warning.getMessage().endswith("invalid_request 1")  # counts only; the next line carries the rest


async def test_a_well_formed_request_on_the_same_server_still_works(gateway: str) -> None:
    await send_raw(gateway, MALFORMED[0][1])
    answer = await send_raw(gateway, "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.status == 200


async def test_the_process_output_never_carries_the_credential(
    provider: MockProvider, policies_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "gateway.out"
    config = gateway_config(provider.url, policies_dir, server={"log_level": "debug"})
    async with gateway_process(config, tmp_path, output=output) as (_, url):
        for _, raw, status, code in MALFORMED * 3:
            assert_catalogue_error(await send_raw(url, raw), status, code)
        await asyncio.sleep(0.3)  # the log writer flushes every 50 ms
    text = output.read_text()
    assert "Traceback" not in text and SECRET not in text and "sk_secret" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["level"] in ("error", "critical")], text
    assert [line["logger"] for line in lines if "malformed" in line["msg"]] == ["edge_proxy.server"], text


def test_refusal_log_writes_one_line_per_interval_with_the_counts_since_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="edge_proxy.server"):
        for code in ["invalid_request", "headers_too_large", "invalid_request", "headers_too_large"]:
            refusals.note(code)
            now[0] += 10
        now[0] = 60
        refusals.note("invalid_request")
    assert [r.getMessage().split(": ")[1] for r in caplog.records] == [
        "invalid_request 1", "headers_too_large 2, invalid_request 2",
    ]


async def test_refused_requests_are_counted_by_status_and_code(gateway: str) -> None:
    for _, raw, _, _ in MALFORMED:
        await send_raw(gateway, raw)
    async with aiohttp.ClientSession() as session, session.get(f"{gateway}/metrics") as response:
        page = samples(await response.text())
    refused = {code: sum(1 for case in MALFORMED if case[3] == code) for _, _, _, code in MALFORMED}
    for code, count in refused.items():
        assert total(page, "edge_proxy_errors_total", route="none", code=code) == count, code
    assert total(page, "edge_proxy_requests_total", route="none", status_class="4xx") == len(MALFORMED)
