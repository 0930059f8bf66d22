"""`edge-proxy serve --workers N`: N worker processes on one port, under a supervisor.

The supervisor (the process `serve` started) binds one SO_REUSEPORT socket per worker slot, all on the same
port, before any worker starts, then runs each worker as a fresh interpreter (`python -m proxy.workers`)
that inherits its slot's socket. Why this shape:
- the kernel spreads new connections evenly over the slots' sockets, where one shared socket lets whichever
  worker wakes first accept a whole burst of connections;
- the supervisor keeps every socket open, so connections queued on the socket of a worker that died wait
  for its replacement instead of being reset; a busy port is still one line before anything starts;
- a fresh interpreter (not a bare fork) inherits no threads, event loop or prometheus-client state, and the
  supervisor stays a small blocking loop.
What the workers must agree on is made once here and handed to each worker on its stdin (never the
environment): the validated config, the demo key (printed once) and, when no signing key is configured, an
ephemeral one, so a token minted by one worker verifies on every other. Each worker keeps its stdin open as
a lifeline: if the supervisor dies, the workers see end-of-file and drain. Metrics use prometheus-client's
multiprocess mode in a directory the supervisor owns (created and removed by it unless
PROMETHEUS_MULTIPROC_DIR names one), so every worker's /metrics serves the sum over all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError
from .event_loop import event_loop_name, run_event_loop

if TYPE_CHECKING:
    from .server import ExitDeadline

log = logging.getLogger("edge_proxy.workers")

RESTART_DELAY_S = 0.5  # before restarting a worker that died; doubles while they keep dying young
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 10.0  # a worker that lived this long died of something else than a start-up loop
KILL_MARGIN_S = 5.0  # past shutdown_grace_s, a worker still draining is killed
_SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by the container's CPU quota (cgroup v2 or v1)."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup allows, or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def worker_count(config: Config, requested: int | None) -> int:
    """`--workers`, else `server.workers`, else the cores available (1 with the memory store). Several workers
    on the memory store are refused: each would keep its own counters, multiplying every limit and budget."""
    chosen = requested if requested is not None else config.server.workers
    memory_store = config.store_settings().kind == "memory"
    if chosen is None:
        return 1 if memory_store else available_cores()
    if chosen > 1 and memory_store:
        raise ConfigError(
            f"{config.source}: server.workers (--workers) is {chosen} but store.kind is memory: each worker process "
            f"would keep its own counters, so every rate limit, concurrency cap and budget would allow {chosen} "
            "times its amount. Fix: use store.kind redis (shared by the workers), or --workers 1"
        )
    return chosen


@dataclass
class _Slot:
    """One worker's place: its sockets (kept open by the supervisor across restarts) and its current process."""

    index: int
    sock: socket.socket
    metrics_sock: socket.socket | None
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    started_at: float = 0.0
    young_deaths: int = 0  # deaths in a row within STABLE_AFTER_S of starting, for the restart backoff
    restart_at: float | None = None

    def fds(self) -> tuple[int, ...]:
        return (self.sock.fileno(),) + ((self.metrics_sock.fileno(),) if self.metrics_sock else ())


class Supervisor:
    """Starts `count` workers, restarts any that dies, forwards SIGHUP, and drains them all on SIGTERM/SIGINT."""

    def __init__(self, config: Config, host: str | None, port: int | None, count: int) -> None:
        from .server import listen_socket, metrics_socket  # the worker's imports, not needed before here

        host = host or config.server.host
        first = listen_socket(host, config.server.port if port is None else port, reuse_port=True)
        first_metrics = metrics_socket(config, host, reuse_port=True)
        self._slots = [_Slot(0, first, first_metrics)]
        for index in range(1, count):  # the same port as the first, which may have been 0 (any free port)
            sock = listen_socket(host, first.getsockname()[1], reuse_port=True)
            metrics = first_metrics and listen_socket(host, first_metrics.getsockname()[1], reuse_port=True)
            self._slots.append(_Slot(index, sock, metrics))
        self._config = config
        self._handoff = self._shared_state(config)
        self._metrics_dir, self._owns_metrics_dir = _metrics_directory()
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        self._ready_r, self._ready_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()

    @staticmethod
    def _shared_state(config: Config) -> dict[str, Any]:
        """What every worker must hold the same: the config, the demo key (printed once here) and, without a
        configured signing key, one ephemeral key for all of them."""
        from .gateway import announce_demo_key, demo_key, signing_keys

        shared: dict[str, Any] = {"config": config.model_dump(mode="json"), "demo_key": None, "signing_key": None}
        if config.demo.enabled:
            _, new_key = demo_key(config)
            shared["demo_key"] = new_key or os.environ[config.demo.key_env].strip()
            if new_key:
                announce_demo_key(config, new_key)
        if not config.auth.signing_keys:
            shared["signing_key"] = signing_keys(config).active.private_pem().decode()
        return shared

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; the exit code is 0 when every worker drained cleanly."""
        previous = {signum: signal.signal(signum, _ignore) for signum in _SUPERVISOR_SIGNALS}
        os.set_blocking(self._wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for slot in self._slots:
                self._start(slot)
            failed = self._wait_until_ready()
            if failed is not None:
                self._drain()
                return failed
            self._announce()
            self._supervise()
            return self._drain()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in (self._ready_r, self._ready_w, self._wake_r, self._wake_w):
                os.close(fd)
            if self._owns_metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _start(self, slot: _Slot) -> None:
        handoff = {**self._handoff, "slot": slot.index, "listen_fd": slot.sock.fileno(), "ready_fd": self._ready_w,
                   "metrics_fd": slot.metrics_sock.fileno() if slot.metrics_sock else None}
        slot.process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, env=self._env,
            pass_fds=(*slot.fds(), self._ready_w),
        )
        slot.ready, slot.started_at, slot.restart_at = False, time.monotonic(), None
        assert slot.process.stdin is not None
        try:  # stdin stays open: the worker's lifeline
            slot.process.stdin.write(json.dumps(handoff).encode() + b"\n")
            slot.process.stdin.flush()
        except BrokenPipeError:  # it died before reading: reaped like any other death
            pass

    def _wait_until_ready(self) -> int | None:
        """Until every worker serves; a worker that exits first stops start-up with its exit code."""
        while not all(slot.ready for slot in self._slots):
            signals = self._wait(None)
            if signal.SIGTERM in signals or signal.SIGINT in signals:
                return 0
            for slot in self._slots:
                code = slot.process.poll() if slot.process else None
                if code is not None:
                    log.error("worker %d (pid %d) exited with %d while starting", slot.index, slot.process.pid, code)
                    return code if code > 0 else 1
        return None

    def _announce(self) -> None:
        first = self._slots[0]
        url = _url(first.sock)
        metrics = f", metrics on {_url(first.metrics_sock)}/metrics" if first.metrics_sock else ""
        pids = ", ".join(str(slot.process.pid) for slot in self._slots if slot.process)
        print(
            f"edge-proxy: serving on {url}{metrics} with {len(self._slots)} workers (pids {pids}), "
            f"{event_loop_name()} event loop (SIGINT or SIGTERM to stop)",
            flush=True,
        )

    def _supervise(self) -> None:
        """Restart workers that die (with a backoff while they die young) until SIGTERM or SIGINT."""
        while True:
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            signals = self._wait(max(0.0, min(due) - time.monotonic()) if due else None)
            if signal.SIGTERM in signals or signal.SIGINT in signals:
                return
            if signal.SIGHUP in signals:  # policy reload, in every worker
                self._signal_workers(signal.SIGHUP)
            now = time.monotonic()
            for slot in self._slots:
                if slot.process is not None and slot.process.poll() is not None:
                    self._schedule_restart(slot, now)
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)

    def _schedule_restart(self, slot: _Slot, now: float) -> None:
        assert slot.process is not None
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(slot.process.pid, str(self._metrics_dir))  # its live gauges stop counting
        if slot.process.stdin is not None:
            slot.process.stdin.close()
        slot.young_deaths = slot.young_deaths + 1 if now - slot.started_at < STABLE_AFTER_S else 1
        delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (slot.young_deaths - 1))
        log.warning(
            "worker %d (pid %d) exited with %s; restarting it in %.1fs",
            slot.index, slot.process.pid, slot.process.returncode, delay,
        )
        slot.process, slot.restart_at = None, now + delay

    def _wait(self, timeout: float | None) -> set[int]:
        """Signals received within `timeout` (or until one arrives); notes workers that became ready meanwhile."""
        readable, _, _ = select.select([self._wake_r, self._ready_r], [], [], timeout)
        signals: set[int] = set()
        if self._wake_r in readable:
            signals.update(os.read(self._wake_r, 256))
        if self._ready_r in readable:
            for line in os.read(self._ready_r, 4096).decode().splitlines():
                index, pid = (int(part) for part in line.split())
                slot = self._slots[index]
                if slot.process is not None and slot.process.pid == pid:
                    slot.ready = True
                    if slot.young_deaths:
                        log.warning("worker %d restarted (pid %d)", index, pid)
        return signals

    def _signal_workers(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def _drain(self) -> int:
        """SIGTERM to every worker, each drains its requests within shutdown_grace_s; stragglers are killed."""
        for slot in self._slots:  # new connections are refused once the workers close their copies too
            slot.sock.close()
            if slot.metrics_sock is not None:
                slot.metrics_sock.close()
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self._config.server.shutdown_grace_s + KILL_MARGIN_S
        clean = True
        for slot in self._slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not drain in time; killing it", slot.index, slot.process.pid)
                slot.process.kill()
                slot.process.wait()
            clean = clean and slot.process.returncode == 0
            if slot.process.stdin is not None:
                slot.process.stdin.close()
        return 0 if clean else 1


def _ignore(signum: int, frame: object) -> None:
    """Signals reach the supervisor's loop through the wakeup fd; the handler itself has nothing to do."""


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _metrics_directory() -> tuple[Path, bool]:
    """PROMETHEUS_MULTIPROC_DIR if set (emptied of old values first, as prometheus-client asks), else a new
    temporary directory; the flag says whether the supervisor made it (and removes it at exit)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return Path(tempfile.mkdtemp(prefix="edge-proxy-metrics-")), True
    directory = Path(given)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory, False


def serve_workers(config: Config, host: str | None, port: int | None, count: int) -> int:
    return Supervisor(config, host, port, count).run()


# -- the worker process -------------------------------------------------------------------------------------


def _worker_main() -> int:
    """One worker: read the supervisor's handoff, serve on the inherited sockets until SIGTERM or the
    supervisor's end (end-of-file on stdin), then drain."""
    from .accesslog import configure_logging
    from .auth.tokens import KeyRing, SigningKey
    from .gateway import build_gateway
    from .server import ExitDeadline, RunningServer, serve_sockets, serve_until_signalled

    handoff = json.loads(sys.stdin.buffer.readline())
    config = Config.model_validate(handoff["config"])
    stop_logging = configure_logging(
        config.server.log_level, json=config.server.log_json, access_log=config.server.access_log
    )
    if handoff["demo_key"]:
        os.environ[config.demo.key_env] = handoff["demo_key"]
    pem = handoff["signing_key"]
    ring = KeyRing(SigningKey.from_pem(pem.encode())) if pem else None
    sock = socket.socket(fileno=handoff["listen_fd"])
    metrics_sock = socket.socket(fileno=handoff["metrics_fd"]) if handoff["metrics_fd"] is not None else None

    def ready(server: RunningServer) -> None:
        os.write(handoff["ready_fd"], f"{handoff['slot']} {os.getpid()}\n".encode())
        os.close(handoff["ready_fd"])

    deadline = ExitDeadline(config.server.shutdown_grace_s)

    async def run() -> None:
        stop = asyncio.Event()
        lifeline = threading.Thread(target=_watch_lifeline, args=(asyncio.get_running_loop(), stop, deadline),
                                    name="edge-proxy-lifeline", daemon=True)
        lifeline.start()
        gateway = build_gateway(config, announce=False, signing_ring=ring)
        await serve_until_signalled(serve_sockets(config, sock, metrics_sock, gateway), ready, stop, deadline)

    try:
        run_event_loop(run())
    except ConfigError as exc:
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_logging()
    return 0


def _watch_lifeline(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, deadline: ExitDeadline) -> None:
    """Blocks on stdin, in a thread of its own so that a stuck event loop cannot miss the supervisor's end: it
    writes nothing more after the handoff, so end-of-file means it is gone. Then the drain begins, and the
    deadline ends the process if the drain cannot."""
    while os.read(sys.stdin.fileno(), 1):
        pass
    log.error("the supervisor is gone; draining")
    deadline.arm()
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop has ended already: the process is on its way out
        pass


if __name__ == "__main__":
    sys.exit(_worker_main())
