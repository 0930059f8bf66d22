"""Start and stop a throwaway redis-server on a free loopback port (never the machine's own Redis)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process; `kill` and `start` again reuse the same port. Without persistence by
    default; `persistent` keeps every write in an append-only file in `workdir`, so data outlives a kill."""

    def __init__(
        self, port: int | None = None, workdir: Path | None = None, persistent: bool = False,
        args: Sequence[str] = (), config_file: Path | None = None,
    ) -> None:
        """`args` are more config options (`--cluster-enabled yes`, `--sentinel`); `config_file` comes first (a
        sentinel needs a file it may rewrite)."""
        if persistent and workdir is None:
            raise ValueError("a persistent redis-server needs a workdir for its append-only file")
        self.port = port or free_port()
        self._args = ([str(config_file)] if config_file else [], list(args))
        self._workdir = workdir
        self._persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 5.0) -> None:
        """Launch the server and wait until it accepts connections."""
        first, more = self._args
        args = ["redis-server", *first, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                *self._persistence, *more]
        self._process = subprocess.Popen(
            args, cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port {self.port}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=5)
            self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, commands queue up unanswered, as in a long stall."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT): it then executes everything that queued up meanwhile."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)  # a paused server could not act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
