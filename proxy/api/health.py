"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from aiohttp import web

from ..gateway import Gateway
from .state import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when this pod can serve: it is not draining and its upstream pools exist.

    Shared dependencies are reported, not counted: with Redis down every replica would turn unready at once and
    the Service would lose all its endpoints, also for the routes and fail-open limits that need no Redis. A store
    outage shows in `dependencies`, in edge_proxy_store_up and as a 503 store_unavailable on the requests that
    need the store. A rejected policy reload is reported too: the previous policy keeps serving.
    """
    gateway = request.app[GATEWAY]
    # Probe, not just read the breaker: with no traffic no request would trip the breaker or close it again,
    # and store_up would go stale. The ping is bounded by the store timeouts and skips an open breaker.
    store_up = await gateway.store.ping()
    gateway.metrics.store_up(store_up)
    checks = {"accepting": not gateway.draining, "upstreams": len(gateway.providers) == len(gateway.config.providers)}
    policy = {"version": gateway.policy.current.version, "last_reload_ok": gateway.policy.last_error is None}
    ready = all(checks.values())
    body = {"ready": ready, "checks": checks, "dependencies": {"store": store_up}, "policy": policy}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if app[GATEWAY].config.server.metrics_port is None:  # else only metrics_app serves it, on its own port
        app.router.add_get("/metrics", metrics)


def metrics_app(gateway: Gateway) -> web.Application:
    """GET /metrics alone, for `server.metrics_port`: scrapes stay off the listener the public reaches."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/metrics", metrics)
    return app
