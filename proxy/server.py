"""Running the gateway: one process, graceful shutdown, client disconnects cancel their handlers.

aiohttp answers the requests its parser refuses (a bad request line, a bad or oversized header) by itself,
before any middleware runs: in plain text that quotes the offending bytes, with an ERROR traceback that
quotes them again, `Authorization` header included. `GatewayRunner` swaps in a connection protocol whose
refusals are catalogue JSON errors that echo nothing, logged as one rate-limited WARNING with counts only.
aiohttp has no public hook for this (aio-libs/aiohttp#3287), so the protocol factory is overridden.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from .accesslog import flush_logs
from .api import health
from .api.state import GATEWAY
from .app import create_app, error_response
from .config import Config, ConfigError
from .context import request_id_for
from .errors import ApiError
from .event_loop import event_loop_name, run_event_loop, settle_heap
from .gateway import Gateway
from .metrics import Metrics
from .record import record_protocol_refusal

log = logging.getLogger("edge_proxy.server")

REFUSAL_LOG_INTERVAL_S = 60.0
_TOO_MANY_HEADERS = "Too many headers"  # aiohttp's message; the parsers raise a plain BadHttpMessage for it


class RefusalLog:
    """At most one WARNING per interval about refused requests, with counts only: unauthenticated clients
    must not be able to flood the log, and the raw request may carry credentials."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self._interval_s = interval_s
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._next_line_at = float("-inf")

    def note(self, code: str) -> None:
        """Count a refusal; write the line if the interval has passed since the last one."""
        self._counts[code] += 1
        now = self._clock()
        if now < self._next_line_at:
            return
        counts = ", ".join(f"{code} {count}" for code, count in sorted(self._counts.items()))
        log.warning("refused malformed HTTP requests since the last such line: %s", counts)
        self._counts.clear()
        self._next_line_at = now + self._interval_s


def protocol_refusal(exc: BaseException | None, max_line_bytes: int, max_headers: int) -> ApiError:
    """The catalogue error for a request aiohttp refused itself; it never quotes the request."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and _TOO_MANY_HEADERS in exc.message):
        return ApiError(
            "headers_too_large",
            f"the request line or a header is longer than {max_line_bytes} bytes, "
            f"or there are more than {max_headers} headers",
        )
    if isinstance(exc, HttpProcessingError):
        return ApiError("invalid_request", "malformed HTTP request: the request line or a header is not valid HTTP/1.1")
    return ApiError("internal_error", "internal error; quote the X-Request-Id when reporting it")


class _GatewayProtocol(web.RequestHandler):
    """aiohttp's connection protocol, except for the answer and the log line of its own refusals."""

    __slots__ = ("_refusals", "_metrics")

    def __init__(self, manager: web.Server, *, refusals: RefusalLog, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._refusals = refusals
        self._metrics = metrics

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: a response is under way, the connection is broken
            raise ConnectionError("response already started; cannot send an error")
        error = protocol_refusal(exc, max(self.max_line_size, self.max_field_size), self.max_headers)
        if error.code == "internal_error":  # something escaped the middlewares: a bug, worth its traceback
            log.error("unhandled error outside the middlewares", exc_info=exc)
        else:
            self._refusals.note(error.code)
        record_protocol_refusal(self._metrics, error)
        response = error_response(error)
        response.headers["X-Request-Id"] = request_id_for(request)
        response.force_close()
        return response


class _GatewayServer(web.Server):
    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refusals = RefusalLog()
        self._metrics = metrics

    def __call__(self) -> web.RequestHandler:
        return _GatewayProtocol(
            self, loop=self._loop, refusals=self._refusals, metrics=self._metrics, **self._kwargs
        )


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections use `_GatewayProtocol`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _GatewayServer(
            server.request_handler, request_factory=server.request_factory, metrics=self.app[GATEWAY].metrics,
            handler_cancellation=server.handler_cancellation, loop=server._loop, **server._kwargs,
        )


@dataclass
class RunningServer:
    runner: web.AppRunner
    url: str
    metrics_runner: web.AppRunner | None = None  # the separate /metrics listener (server.metrics_port)
    metrics_url: str | None = None

    async def stop(self) -> None:
        await self.runner.cleanup()  # drains; metrics stay scrapable meanwhile
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()


def runner_options(config: Config) -> dict[str, Any]:
    # handler_cancellation: a client that hangs up cancels its handler, which closes the upstream call.
    # keepalive_timeout: aiohttp closes a connection still waiting for a whole request head after it; its own
    # default (an hour) let a client dribbling header lines hold a connection that long.
    return {
        "handler_cancellation": True, "shutdown_timeout": config.server.shutdown_grace_s, "access_log": None,
        "keepalive_timeout": config.server.idle_timeout_s,
    }


LISTEN_BACKLOG = 128  # aiohttp's TCPSite default


def listen_socket(
    host: str, port: int, setting: str = "server.port (--port)", reuse_port: bool = False
) -> socket.socket:
    """The listening socket, bound before anything else starts, so a busy port is a one-line error instead of a
    traceback after a demo key that could never be used. `::` listens on every IPv6 and IPv4 address (one
    dual-stack socket, as IPv6-only and dual-stack clusters need); another host binds its first address.
    `reuse_port`: SO_REUSEPORT, so the supervisor can bind one socket per worker on the same port."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        dual_stack = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
        return socket.create_server(
            address[:2], family=family, backlog=LISTEN_BACKLOG, dualstack_ipv6=dual_stack, reuse_port=reuse_port
        )
    except OSError as exc:
        raise ConfigError(
            f"server.host/{setting.split()[0]}: cannot listen on {_url(host, port)}: "
            f"{os.strerror(exc.errno) if exc.errno else exc}. Fix: stop what is using that address, "
            f"or choose another with {setting} or server.host (--host)"
        ) from None


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def metrics_socket(config: Config, host: str | None, reuse_port: bool = False) -> socket.socket | None:
    """The separate /metrics listener (`server.metrics_port`), if configured."""
    if config.server.metrics_port is None:
        return None
    return listen_socket(host or config.server.host, config.server.metrics_port, "server.metrics_port", reuse_port)


async def start_server(
    config: Config, host: str | None = None, port: int | None = None, gateway: Gateway | None = None
) -> RunningServer:
    """Start serving in the running loop (used by tests and embedders); port 0 picks a free one. The sockets
    are bound before the gateway is built, so a busy port stops start-up before a demo key is printed."""
    sock = listen_socket(host or config.server.host, config.server.port if port is None else port)
    return await serve_sockets(config, sock, metrics_socket(config, host), gateway)


async def serve_sockets(
    config: Config, sock: socket.socket, metrics_sock: socket.socket | None, gateway: Gateway | None = None
) -> RunningServer:
    """Serve on sockets already bound (by `start_server`, or by the worker supervisor before it started us)."""
    app = create_app(config, gateway)
    runner = GatewayRunner(app, **runner_options(config))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    server = RunningServer(runner, _url(*sock.getsockname()[:2]))
    if metrics_sock is not None:
        server.metrics_runner = web.AppRunner(health.metrics_app(app[GATEWAY]), access_log=None)
        await server.metrics_runner.setup()
        await web.SockSite(server.metrics_runner, metrics_sock).start()
        server.metrics_url = _url(*metrics_sock.getsockname()[:2])
    return server


# Past server.shutdown_grace_s, what follows the drain (the pending settles' last flush, at most 2 s, closing the
# store and pools, the tracing flush) has this long before the process ends regardless. Below the supervisor's
# KILL_MARGIN_S, so a stuck worker ends by itself, with a log line saying so.
DRAIN_MARGIN_S = 4.0
STUCK_EXIT_CODE = 1  # as a worker the supervisor had to kill: not a clean drain
LOG_FLUSH_TIMEOUT_S = 0.5


class ExitDeadline:
    """Once armed (a stop began), ends the process `shutdown_grace_s + DRAIN_MARGIN_S` later if it is still
    there, whatever holds it: a cleanup awaiting forever, a blocked event loop, a thread it joins. A timer
    thread of its own, so it needs neither the event loop nor the main thread."""

    def __init__(self, grace_s: float) -> None:
        self._seconds = grace_s + DRAIN_MARGIN_S
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start the countdown (once; later calls, from any thread, keep the first)."""
        with self._lock:
            if self._timer is None:
                self._timer = threading.Timer(self._seconds, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        log.error("still not stopped %.1fs after the stop began (server.shutdown_grace_s and %.1fs); exiting",
                  self._seconds, DRAIN_MARGIN_S)
        flush_logs(LOG_FLUSH_TIMEOUT_S)
        os._exit(STUCK_EXIT_CODE)


async def serve_until_signalled(
    start: Awaitable[RunningServer], on_ready: Callable[[RunningServer], None], stop: asyncio.Event | None = None,
    deadline: ExitDeadline | None = None,
) -> None:
    """Run the server `start` opens until SIGINT/SIGTERM (or `stop` is set), then drain it; `on_ready` says it
    serves. A signal arms `deadline`, if given (whoever sets `stop` arms it themselves)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stop.set()
        if deadline is not None:
            deadline.arm()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    server = await start
    settle_heap()
    on_ready(server)
    try:
        await stop.wait()
    finally:
        await server.stop()  # stops accepting, then lets requests in flight finish within shutdown_grace_s


def _announce(server: RunningServer) -> None:
    metrics = f", metrics on {server.metrics_url}/metrics" if server.metrics_url else ""
    print(f"edge-proxy: serving on {server.url}{metrics}, {event_loop_name()} event loop (SIGINT or SIGTERM to stop)",
          flush=True)


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve in this process until SIGINT/SIGTERM, then finish requests in flight up to `server.shutdown_grace_s`
    (the process ends `DRAIN_MARGIN_S` after that at the latest)."""
    deadline = ExitDeadline(config.server.shutdown_grace_s)
    run_event_loop(serve_until_signalled(start_server(config, host, port), _announce, deadline=deadline))

