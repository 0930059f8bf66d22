"""The official `openai` Node SDK for tests: a pinned npm package installed once into the tests' cache
(tests/helm_tool.py), and a script of ours run next to it. If npm cannot install it, the test is skipped saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
from pathlib import Path
from typing import IO, Any

import pytest

from tests.gateway_harness import TEST_KEY
from tests.helm_tool import npm_installed

OPENAI_NPM_PACKAGE = "openai@6.49.0"  # pinned; the 7.x line needs Node 22
ANSWER_TIMEOUT_S = 30  # the SDK's own timeout is 10 s per call; this bounds a Node process that hangs


def openai_node_script(name: str) -> Path:
    """tests/<name> next to the installed SDK (ES modules resolve their imports from the script's folder)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    try:
        folder = npm_installed(OPENAI_NPM_PACKAGE)
    except RuntimeError as exc:
        pytest.skip(f"the openai Node SDK cannot be installed: {exc}")
    script = folder / name
    shutil.copy(Path(__file__).with_name(name), script)
    return script


class NodeChatClient:
    """One Node process (tests/openai_node_calls.mjs) that makes `chat.completions.create` calls on request, so a
    module of tests pays Node's start-up once. Calls run one at a time, each bounded by ANSWER_TIMEOUT_S."""

    def __init__(self, stderr: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            ["node", str(openai_node_script("openai_node_calls.mjs"))], env={**os.environ, "GATEWAY_KEY": TEST_KEY},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )

    async def create(self, base_url: str, **params: Any) -> dict[str, Any]:
        """What the SDK gave back: {"completion"}, {"chunks"}, and {"error"} if it raised."""
        # In a thread: the gateway under test runs on this event loop and must keep serving while we wait.
        return await asyncio.to_thread(self._ask, {"baseURL": base_url, "params": params})

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], ANSWER_TIMEOUT_S)
        assert ready, f"the Node SDK did not answer within {ANSWER_TIMEOUT_S} s"
        line = self.process.stdout.readline()
        assert line, f"the Node SDK process exited with {self.process.wait(5)}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the script's loop ends with its input
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
