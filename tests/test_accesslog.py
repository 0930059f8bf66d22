"""Access log lines: one JSON object per request, fixed schema, never a secret."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import pytest

from proxy.accesslog import ACCESS_FIELDS, REDACTED, configure_logging, log_access, principal_log_id
from proxy.auth.principal import Principal
from tests.gateway_harness import gateway_config, start_gateway
from tests.mock_provider import MockProvider


Reader = Callable[[], list[dict]]


@pytest.fixture
def read_lines() -> Iterator[Reader]:
    """JSON logging into a buffer; yields a reader that flushes the writer and parses every line."""
    buffer = io.StringIO()
    stop = configure_logging("warning", json=True, stream=buffer)

    def read() -> list[dict]:
        stop()  # joins the writer thread: every queued line is in the buffer now
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield read
    stop()
    logging.getLogger().handlers.clear()


def test_one_json_line_per_request_with_the_schema(read_lines: Reader) -> None:
    log_access({
        "request_id": "req_1", "method": "POST", "path": "/v1/chat/completions", "route": "/v1/chat/completions",
        "status": 200, "principal_type": "api_key", "principal_id": "backend", "model": "openai/gpt-5.4-mini",
        "provider": "openai", "upstream_status": 200, "duration_ms": 812.5, "ttfb_ms": 95.1,
        "tokens_in": 12, "tokens_out": 34, "credits": 0.02, "error": None, "not_in_schema": "dropped",
    })
    [line] = read_lines()
    assert line["logger"] == "edge_proxy.access" and line["level"] == "info"
    assert set(ACCESS_FIELDS) <= set(line) and "not_in_schema" not in line
    assert (line["request_id"], line["status"], line["tokens_out"], line["duration_ms"]) == ("req_1", 200, 34, 812.5)
    assert line["ts"].endswith("+00:00")


def test_access_lines_survive_a_higher_log_level(read_lines: Reader) -> None:
    logging.getLogger("edge_proxy.app").info("not shown at warning")
    logging.getLogger("edge_proxy.app").warning("shown")
    log_access({"request_id": "req_2", "status": 204})
    assert [line["msg"] for line in read_lines()] == ["shown", "access"]


def test_secrets_and_query_strings_never_reach_the_log(read_lines: Reader) -> None:
    api_key = "sk_live_" + "a" * 32
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"
    log_access({"request_id": "req_3", "path": f"/v1/models?token={jwt}", "principal_id": api_key,
                "error": f"bad key {api_key}"})
    [line] = read_lines()
    text = json.dumps(line)
    assert api_key not in text and jwt not in text
    assert line["path"] == "/v1/models"
    assert line["principal_id"] == REDACTED and line["error"] == REDACTED


def test_exceptions_are_one_json_line(read_lines: Reader) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("edge_proxy.app").exception("handler failed")
    [line] = read_lines()
    assert line["level"] == "error" and "RuntimeError: boom" in line["exc"]


def test_the_direct_access_line_is_the_line_the_formatter_writes(read_lines: Reader) -> None:
    """Access lines skip the LogRecord when the JSON writer is the only handler; with another handler present
    (a capture), they go through the logging module: both lines are the same, timestamps aside."""
    record = {"request_id": "req_5", "path": "/v1/chat/completions?key=sk_live_" + "b" * 32, "status": 200,
              "duration_ms": 1.5, "credits": 0.25, "error": "Bearer abc.def", "model": "m/\u00e9"}
    log_access(record)
    capture = logging.NullHandler()
    logging.getLogger().addHandler(capture)
    log_access(record)
    logging.getLogger().removeHandler(capture)
    direct, formatted = read_lines()
    assert {**direct, "ts": None} == {**formatted, "ts": None}
    assert direct["path"] == "/v1/chat/completions" and direct["error"] == REDACTED and direct["model"] == "m/\u00e9"


def test_text_mode_is_readable() -> None:
    buffer = io.StringIO()
    stop = configure_logging("info", json=False, stream=buffer)
    log_access({"request_id": "req_4", "status": 200, "path": "/v1/me"})
    stop()
    logging.getLogger().handlers.clear()
    assert "request_id=req_4 path=/v1/me status=200" in buffer.getvalue()


def test_bad_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")


def test_principal_log_id_is_key_id_or_subject_hash() -> None:
    via_key = Principal(kind="gateway_token", account="acme", plan="pro", key_id="backend", subject="user-1")
    via_idp = Principal(kind="issuer", account="acct_9", plan="members", issuer="clerk", subject="user_2abc")
    assert principal_log_id(via_key) == "backend"
    hashed = principal_log_id(via_idp)
    assert hashed is not None and hashed.startswith("sub_") and "user_2abc" not in hashed
    assert hashed == principal_log_id(via_idp)
    assert principal_log_id(None) is None


def test_batching_writer_survives_a_broken_stream_and_stays_bounded() -> None:
    import io
    import logging
    import time

    from proxy.accesslog import BatchingWriter

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("stdout went away")

    writer = BatchingWriter(Broken(), interval_s=0.01, max_pending=5)
    writer.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "line", None, None)
    for _ in range(50):
        writer.emit(record)
    assert len(writer._lines) <= 5
    time.sleep(0.05)  # several write attempts on the broken stream
    assert writer._thread.is_alive()
    writer.close()


def test_batching_writer_writes_every_line_in_order_on_close() -> None:
    import io
    import logging

    from proxy.accesslog import BatchingWriter

    out = io.StringIO()
    writer = BatchingWriter(out, interval_s=10)  # nothing written until close flushes
    writer.setFormatter(logging.Formatter("%(message)s"))
    for i in range(100):
        writer.emit(logging.LogRecord("t", logging.INFO, __file__, 1, f"line {i}", None, None))
    writer.close()
    assert out.getvalue().splitlines() == [f"line {i}" for i in range(100)]


SECRETS = ("sk_live_" + "b" * 32, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl", "opaque-provider-token-123")


def test_any_record_is_redacted_message_traceback_and_arguments(read_lines: Reader) -> None:
    api_key, jwt, opaque = SECRETS
    logger = logging.getLogger("aiohttp.server")  # a library's logger: nothing in the gateway vets what it logs
    logger.warning("request %r", f"GET / HTTP/1.1\r\nAuthorization: Bearer {opaque}\r\nX-Key: {api_key}\r\n")
    try:
        raise ValueError(f"bad token {jwt}")
    except ValueError:
        logger.exception("failed with key=%s", api_key)
    logger.warning("disk_usage_bytes and task_sk_namespace_list stay readable", stack_info=True)
    lines = read_lines()
    text = json.dumps(lines)
    assert not [secret for secret in SECRETS if secret in text]
    assert lines[0]["msg"].count(REDACTED) == 2 and "Authorization: [redacted]" in lines[0]["msg"]
    assert lines[1]["msg"] == f"failed with key={REDACTED}" and f"ValueError: bad token {REDACTED}" in lines[1]["exc"]
    assert lines[2]["msg"] == "disk_usage_bytes and task_sk_namespace_list stay readable"


def test_text_mode_redacts_tracebacks_too() -> None:
    buffer = io.StringIO()
    stop = configure_logging("info", json=False, stream=buffer)
    try:
        raise RuntimeError(f"Authorization: Bearer {SECRETS[2]}")
    except RuntimeError:
        logging.getLogger("edge_proxy.app").exception("boom")
    stop()
    logging.getLogger().handlers.clear()
    assert SECRETS[2] not in buffer.getvalue() and f"RuntimeError: Authorization: {REDACTED}" in buffer.getvalue()


async def test_probe_and_scrape_paths_can_be_kept_out_of_the_access_log(
    read_lines: Reader, provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    """Probes every few seconds per pod drown the requests in the log; skipped paths are still counted."""
    config = gateway_config(provider.url, policies_dir)
    config["server"]["access_log_skip_paths"] = ["/healthz", "/readyz", "/metrics"]
    server = await start_gateway(config)
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/healthz"):
                async with http.get(f"{server.url}{path}") as response:
                    await response.read()
            async with http.get(f"{server.url}/metrics") as response:
                metrics = await response.text()
    finally:
        await server.stop()
    assert [line["path"] for line in read_lines() if line["logger"] == "edge_proxy.access"] == ["/v1/models"]
    healthz = [line for line in metrics.splitlines()
               if line.startswith("edge_proxy_requests_total{") and 'route="/healthz"' in line]
    assert len(healthz) == 1 and healthz[0].endswith(" 2.0"), healthz
