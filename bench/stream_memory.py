"""What one open SSE stream holds in the gateway process: RSS, Python heap by allocation site, objects by type.

    python bench/stream_memory.py [--streams 1000] [--top 25] [--no-trace] [--asyncio]

Starts on loopback, and stops by itself: a real redis-server, the mock OpenAI-format upstream of bench/relay.py,
and the gateway in this process with the full pipeline of bench/compare.py (API key, plan with rate limits,
concurrency and budget, prices, the Redis store, the access log, metrics), on uvloop when installed. A client in
a child process opens `--streams` SSE calls and holds each after its first event. Around that, this process
reads its RSS, the Python heap (tracemalloc, grouped by allocation site; off with --no-trace, whose RSS figure
is then free of tracemalloc's own tables) and the objects the garbage collector tracks (count and shallow size
by type). Everything is printed per open stream. The machine is usually shared: RSS moves by a few KiB per stream
between runs; the tracemalloc and object figures are exact for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compare import PATH, pipeline_config, raise_file_limit, rss_kib  # noqa: E402
from relay import UPSTREAM, free_port  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

WARM_STREAMS = 50  # opened and closed first, so pools, caches and scripts are in place before the measurement
TRACE_FRAMES = 25
OPEN_TIMEOUT_S = 300  # for all streams to open
TRACED_AT_ONCE = 20  # streams being opened at once while tracing (slow): the store's calls stay within their timeout

# The client: holds `streams` SSE calls open after their first event; says "open" when all are, then waits for
# its stdin to close.
CLIENT = r'''
import asyncio, json, sys
sys.path.insert(0, sys.argv[3])
import aiohttp
from compare import HEADERS, MODEL, Hold
async def main():
    url, count, at_once, prompt_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
    hold = Hold(opening=asyncio.Semaphore(at_once))
    body = json.dumps({"model": MODEL, "stream": True, "bench_chunks": 2, "bench_delay_ms": 600_000,
                       "messages": [{"role": "user", "content": "word " * (prompt_bytes // 5) or "hi"}]}).encode()
    async def one(session):
        await hold.opening.acquire()
        async with session.post(url, data=body, headers=HEADERS) as r:
            if r.status != 200:
                raise RuntimeError(f"stream answered {r.status}: {(await r.read())[:200]!r}")
            async for line in r.content:
                if line.startswith(b"data:"):
                    hold.open_streams += 1
                    hold.opening.release()
                    await hold.release.wait()
                    return
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        while hold.open_streams < count:
            await asyncio.sleep(0.05)
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                raise failed[0].exception()
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        hold.release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
asyncio.run(main())
'''


class Streams:
    """A client child process holding `count` streams open until `close`."""

    def __init__(self, url: str, count: int, at_once: int, prompt_bytes: int) -> None:
        here = str(Path(__file__).resolve().parent)
        self._child = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, str(count), here, str(at_once), str(prompt_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def opened(self) -> None:
        assert self._child.stdout is not None
        reading = asyncio.get_running_loop().run_in_executor(None, self._child.stdout.readline)
        line = await asyncio.wait_for(reading, OPEN_TIMEOUT_S)
        if line.strip() != b"open":
            raise RuntimeError(f"the client failed (exit {self._child.wait()})")

    async def close(self) -> None:
        assert self._child.stdin is not None
        self._child.stdin.close()
        await asyncio.get_running_loop().run_in_executor(None, self._child.wait, 30)


def objects_by_type() -> Counter[str]:
    """Shallow bytes per type of every object the garbage collector tracks, and `#type` counts."""
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind.__module__, str) else repr(kind)
        sizes[name] += sys.getsizeof(obj)
        sizes["#" + name] += 1
    return sizes


def owner(trace: tracemalloc.Traceback) -> str:
    """The allocation site worth naming: the innermost frame of a library or of the gateway, and the gateway's
    own innermost frame that led there (`library line < gateway line`)."""
    frames = [_short(frame) for frame in reversed(trace)]  # innermost first (tracemalloc stores oldest first)
    library = next((f for f in frames if f.startswith(_LIBRARIES)), frames[0])
    gateway = next((f for f in frames if f.startswith("proxy/")), None)
    return library if gateway in (None, library) else f"{library} < {gateway}"


_LIBRARIES = ("proxy/", "aiohttp/", "redis/", "multidict/", "yarl/", "uvloop/", "asyncio/", "contextlib")


def _short(frame: tracemalloc.Frame) -> str:
    path = frame.filename
    for marker, prefix in (("site-packages/", ""), ("/proxy/", "proxy/"), ("/lib/python3.", "")):
        if marker in path:
            path = prefix + path.split(marker, 1)[1]
            break
    if path[:1].isdigit():  # the standard library: "11/asyncio/x.py" -> "asyncio/x.py"
        path = path.split("/", 1)[1]
    return f"{path}:{frame.lineno}"


async def warm(url: str, prompt_bytes: int) -> None:
    streams = Streams(url, WARM_STREAMS, WARM_STREAMS, prompt_bytes)
    await streams.opened()
    await streams.close()
    await asyncio.sleep(1.0)  # the held upstream calls end, their settles land


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_kib() -> dict[str, float]:
    """The process's memory by allocator: RSS; CPython's small-object allocator (pymalloc: objects up to 512
    bytes, in its own mmap'd arenas), bytes in its blocks and the arenas' size; glibc malloc's bytes in use (larger
    Python objects, C structures of uvloop/libuv, llhttp, hiredis); tracemalloc's own tables when tracing."""
    gc.collect()
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    malloc = mallinfo2()
    blocks, arenas = pymalloc_stats() if not tracemalloc.is_tracing() else (0, 0)  # its hooks hide pymalloc's stats
    return {"rss": rss_kib(os.getpid()), "pymalloc_blocks": blocks / 1024, "pymalloc_arenas": arenas / 1024,
            "malloc_in_use": (malloc.uordblks + malloc.hblkhd) / 1024,
            "tracemalloc_tables": tracemalloc.get_tracemalloc_memory() / 1024 if tracemalloc.is_tracing() else 0.0}


def pymalloc_stats() -> tuple[int, int]:
    """(bytes in allocated blocks, bytes in arenas) from `sys._debugmallocstats`, which writes to fd 2."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode()
    blocks = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    arenas = re.search(r"\d+ arenas \* \d+ bytes/arena\s*=\s*([\d,]+)", text)
    assert blocks is not None and arenas is not None, "unexpected sys._debugmallocstats output"
    return int(blocks.group(1).replace(",", "")), int(arenas.group(1).replace(",", ""))


async def measure(url: str, count: int, top: int, trace: bool, prompt_bytes: int) -> dict[str, Any]:
    await warm(url, prompt_bytes)
    if trace:  # from here on only: tracing slows every allocation (the store's calls would time out at start-up)
        tracemalloc.start(TRACE_FRAMES)
    heap0, types0 = heap_kib(), objects_by_type()
    snapshot0 = tracemalloc.take_snapshot() if trace else None
    streams = Streams(url, count, TRACED_AT_ONCE if trace else 200, prompt_bytes)
    await streams.opened()
    await asyncio.sleep(0.5)  # the last streams' first events are relayed
    heap1, types1 = heap_kib(), objects_by_type()
    snapshot1 = tracemalloc.take_snapshot() if trace else None
    await streams.close()

    result: dict[str, Any] = {"streams": count, "prompt_bytes": prompt_bytes, "kib_per_stream": {k: (heap1[k] - heap0[k]) / count for k in heap0}}
    types = {k: (types1[k] - types0.get(k, 0)) / count for k in types1 if not k.startswith("#")}
    result["objects"] = sorted(
        ((name, (types1["#" + name] - types0.get("#" + name, 0)) / count, size) for name, size in types.items()),
        key=lambda row: -row[2])[:top]
    result["objects_total_bytes"] = sum(types.values())
    if snapshot0 is not None and snapshot1 is not None:
        sites: Counter[str] = Counter()
        blocks: Counter[str] = Counter()
        files: Counter[str] = Counter()
        for stat in snapshot1.compare_to(snapshot0, "traceback"):
            site = owner(stat.traceback)
            sites[site] += stat.size_diff
            blocks[site] += stat.count_diff
            files[site.split(":", 1)[0]] += stat.size_diff
        result["traced_bytes_per_stream"] = sum(sites.values()) / count
        result["sites"] = [(site, blocks[site] / count, size / count) for site, size in sites.most_common(top)]
        result["files"] = [(name, size / count) for name, size in files.most_common(top)]
    return result


def print_report(result: dict[str, Any]) -> None:
    count, kib = result["streams"], result["kib_per_stream"]
    prompt = f", prompts of {result['prompt_bytes']:,} bytes" if result["prompt_bytes"] else ""
    print(f"\n{count} open streams{prompt}, KiB per stream:")
    if "sites" in result:
        print(f"  RSS {kib['rss']:.1f}, tracemalloc's own tables {kib['tracemalloc_tables']:.1f} of it; malloc in use "
              f"{kib['malloc_in_use']:.1f}; traced by tracemalloc (the Python heap: objects in pymalloc and "
              f"malloc) {result['traced_bytes_per_stream'] / 1024:.1f}")
        print(f"\n{'bytes/stream':>12}  allocated in (innermost library or gateway file)")
        for name, size in result["files"]:
            print(f"{size:>12,.0f}  {name}")
        print(f"\n{'bytes/stream':>12} {'blocks/stream':>13}  allocation site (innermost library or gateway line "
              "< the gateway's line that led there)")
        for site, blocks, size in result["sites"]:
            print(f"{size:>12,.0f} {blocks:>13.1f}  {site}")
    else:
        print(f"  RSS {kib['rss']:.1f} = pymalloc arenas {kib['pymalloc_arenas']:.1f} (blocks in use "
              f"{kib['pymalloc_blocks']:.1f}) + malloc in use {kib['malloc_in_use']:.1f} + the rest "
              f"{kib['rss'] - kib['pymalloc_arenas'] - kib['malloc_in_use']:.1f} (free memory kept, page rounding)")
    print(f"\n{'bytes/stream':>12} {'objects/stream':>14}  type (shallow size of the objects the garbage collector "
          f"tracks; total {result['objects_total_bytes']:,.0f} bytes)")
    for name, number, size in result["objects"]:
        print(f"{size:>12,.0f} {number:>14.2f}  {name}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from proxy.config import load_config
    from proxy.server import start_server

    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer()
        redis_server.start()
        up_port = free_port()
        upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port), "1"])
        try:
            config = load_config(pipeline_config(Path(tmp), up_port, redis_server.url, args.streams))
            server = await start_server(config, "127.0.0.1", 0)
            try:
                return await measure(server.url + PATH, args.streams, args.top, not args.no_trace, args.prompt_bytes)
            finally:
                await server.stop()
        finally:
            upstream.kill()  # its handlers still sleep on the held streams' next events
            upstream.wait(timeout=30)
            redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--prompt-bytes", type=int, default=0,
                        help="each call's message this long (0: a two-letter prompt, as bench/compare.py sends)")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--no-trace", action="store_true", help="RSS only, without tracemalloc's overhead")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's own event loop instead of uvloop")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    raise_file_limit(4 * args.streams + 4096)
    from proxy.event_loop import run_event_loop
    if args.asyncio:
        os.environ["EDGE_PROXY_UVLOOP"] = "0"
    result: dict[str, Any] = {}

    async def go() -> None:
        result.update(await run(args))

    run_event_loop(go())
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
