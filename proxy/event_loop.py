"""The event loop `edge-proxy serve` runs on (one process or each worker): uvloop's when it is installed (the
`fast` extra) and EDGE_PROXY_UVLOOP is not 0, else asyncio's own. What each buys: docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from typing import Any, Callable, Coroutine


def run_event_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run `main` to completion on a new event loop of the chosen kind, then give SIGINT and SIGTERM back the
    handlers they had: uvloop leaves its handler of the closed loop installed, which swallows both, so a process
    stuck after its loop ended (joining a thread) could not be stopped but by SIGKILL."""
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            runner.run(main)
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)


# The collector's youngest-generation threshold while serving (CPython's default: 700 net new container objects).
# A request makes and frees thousands, nearly all by reference counting; at 700 the collector ran about every
# tenth request and walked the objects of every request in flight. Measured (bench/profile_gateway.py), with
# `settle_heap`: garbage collection 97 -> 1 µs of CPU per metered call (the freeze alone: 55).
YOUNG_GC_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once start-up is done: what it built (modules, config, catalogue, policies, pools) lives as long as the
    process, so the collector stops walking it (`gc.freeze`: each full collection walked all of it, ~60 ms of
    stalled loop about every 1,000 calls), and young collections run less often. A start-up object that later
    becomes garbage is still freed by reference counting; only one caught in a reference cycle is kept."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, oldest)


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
