"""The official `openai` Node SDK through `/openai/v1`: models.list (also from `/v1`), a streamed chat, an error.

The SDK is a pinned npm package installed once into the tests' cache (tests/helm_tool.py); if npm cannot install
it, the test is skipped saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.gateway_harness import TEST_KEY
from tests.helm_tool import npm_installed
from tests.test_openai_surface import MOCK_IDS

OPENAI_NPM_PACKAGE = "openai@6.49.0"  # pinned; the 7.x line needs Node 22


def node_client() -> Path:
    """tests/openai_node_client.mjs next to the installed SDK (ES modules resolve from the script's folder)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    try:
        folder = npm_installed(OPENAI_NPM_PACKAGE)
    except RuntimeError as exc:
        pytest.skip(f"the openai Node SDK cannot be installed: {exc}")
    script = folder / "openai_node_client.mjs"
    shutil.copy(Path(__file__).with_name("openai_node_client.mjs"), script)
    return script


async def test_openai_node_sdk_lists_models_streams_a_chat_and_raises_errors(gateway: str) -> None:
    script = node_client()
    node = await asyncio.create_subprocess_exec(
        "node", str(script), env={**os.environ, "GATEWAY_URL": gateway, "GATEWAY_KEY": TEST_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(node.communicate(), 60)
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()
    assert node.returncode == 0, err.decode()
    got = json.loads(out)
    assert [m["id"] for m in got["listed"]] == MOCK_IDS == got["listedOnV1"]
    assert got["listed"][0] == {"id": "mock/chat", "object": "model", "created": 0, "owned_by": "Tests",
                                "name": "Mock Chat", "capability": "text2text"}
    assert got["text"] == "Hello from the mock"
    assert got["refused"] == {"status": 404, "code": "model_not_found", "type": "not_found_error",
                              "name": "NotFoundError"}
