"""The official `openai` Node SDK through `/openai/v1`: models.list (also from `/v1`), a streamed chat, an error.

The SDK comes from tests/openai_node.py (a pinned npm package, cached; skipped saying why if npm cannot install it).
"""

from __future__ import annotations

import asyncio
import json
import os

from tests.gateway_harness import TEST_KEY
from tests.openai_node import openai_node_script
from tests.test_openai_surface import MOCK_IDS


async def test_openai_node_sdk_lists_models_streams_a_chat_and_raises_errors(gateway: str) -> None:
    script = openai_node_script("openai_node_client.mjs")
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
