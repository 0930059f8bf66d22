"""The event loop `edge-proxy serve` runs on (one process or each worker): uvloop's when it is installed (the
`fast` extra) and EDGE_PROXY_UVLOOP is not 0, else asyncio's own. What each buys: docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Coroutine


def run_event_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run `main` to completion on a new event loop of the chosen kind."""
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        runner.run(main)


def event_loop_name() -> str:
    """The kind `run_event_loop` uses, for start-up lines."""
    return "uvloop" if _uvloop_factory() else "asyncio"


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("EDGE_PROXY_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
