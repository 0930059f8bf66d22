"""Running the gateway: one process, graceful shutdown, client disconnects cancel their handlers."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .app import create_app
from .config import Config
from .gateway import Gateway


@dataclass
class RunningServer:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


def runner_options(config: Config) -> dict[str, object]:
    # handler_cancellation: a client that hangs up cancels its handler, which closes the upstream call.
    return {"handler_cancellation": True, "shutdown_timeout": config.server.shutdown_grace_s, "access_log": None}


async def start_server(
    config: Config, host: str | None = None, port: int | None = None, gateway: Gateway | None = None
) -> RunningServer:
    """Start serving in the running loop (used by tests and embedders); port 0 picks a free one."""
    runner = web.AppRunner(create_app(config, gateway), **runner_options(config))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, host or config.server.host, config.server.port if port is None else port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return RunningServer(runner, f"http://{bound_host}:{bound_port}")


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish requests in flight up to `server.shutdown_grace_s`."""
    web.run_app(
        create_app(config),
        host=host or config.server.host,
        port=config.server.port if port is None else port,
        print=lambda line: print(f"edge-proxy: {line}", flush=True),
        **runner_options(config),  # type: ignore[arg-type]
    )
