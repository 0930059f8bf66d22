"""The listener: `::` serves IPv6 and IPv4; a busy port is a one-line error before anything is printed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.config import parse_config
from proxy.server import start_server
from tests.gateway_harness import gateway_config
from tests.mock_provider import MockProvider

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="the kernel has no dual-stack IPv6 sockets")
async def test_ipv6_any_address_serves_ipv6_and_ipv4(provider: MockProvider, gateway_env: None,
                                                     policies_dir: Path) -> None:
    config = gateway_config(provider.url, policies_dir)
    config["server"]["host"] = "::"
    server = await start_server(parse_config(config, "test-config"), port=0)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        assert server.url == f"http://[::]:{port}"
        async with aiohttp.ClientSession() as http:
            for host in ("[::1]", "127.0.0.1"):
                async with http.get(f"http://{host}:{port}/healthz") as response:
                    assert response.status == 200, host
    finally:
        await server.stop()


def test_a_busy_port_is_one_clear_line_and_no_demo_key(tmp_path: Path) -> None:
    """Before: a traceback from deep in asyncio, after a demo API key that could never be used."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["policies"]["dir"] = str(ROOT / "policies")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path / "config.yaml"), "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"edge-proxy: server.host/server.port: cannot listen on http://127.0.0.1:{port}: Address already in use. "
        "Fix: stop what is using that address, or choose another with server.port (--port) or server.host (--host)"
    ], result.stderr
    assert "demo API key" not in result.stdout and "serving on" not in result.stdout


async def test_metrics_port_keeps_scrapes_off_the_public_listener(provider: MockProvider, gateway_env: None,
                                                                  policies_dir: Path) -> None:
    config = gateway_config(provider.url, policies_dir)
    config["server"]["metrics_port"] = 0
    server = await start_server(parse_config(config, "test-config"), port=0)
    try:
        assert server.metrics_url and server.metrics_url != server.url
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/metrics") as response:
                assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
            async with http.get(f"{server.url}/readyz") as response:
                assert response.status == 200
            async with http.get(f"{server.metrics_url}/metrics") as response:
                assert response.status == 200 and "edge_proxy_requests_total" in await response.text()
            async with http.get(f"{server.metrics_url}/v1/models") as response:
                assert response.status == 404
    finally:
        await server.stop()
