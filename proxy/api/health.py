"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from aiohttp import web

from ..gateway import Gateway
from .state import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining, the store answers (or its fail mode covers it) and upstream pools exist.

    A rejected policy reload is reported but does not fail readiness: the previous policy keeps serving.
    """
    gateway = request.app[GATEWAY]
    # Probe, not just read the breaker: an unready replica gets no traffic, so no request would ever
    # trip the breaker or close it again. The ping is bounded by the store timeouts and skips an open breaker.
    store_up = await gateway.store.ping()
    checks = {
        "accepting": not gateway.draining,
        "store": store_up,
        "upstreams": len(gateway.providers) == len(gateway.config.providers),
    }
    policy = {"version": gateway.policy.current.version, "last_reload_ok": gateway.policy.last_error is None}
    ready = checks["accepting"] and checks["upstreams"] and (checks["store"] or _store_fails_open(gateway))
    gateway.metrics.store_up(checks["store"])
    return web.json_response({"ready": ready, "checks": checks, "policy": policy}, status=200 if ready else 503)


def _store_fails_open(gateway: Gateway) -> bool:
    settings = gateway.store_settings
    return settings.fail_credits == "open" and settings.fail_rate_limits == "open"


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
