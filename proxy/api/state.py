"""Where handlers find the gateway's shared parts."""

from aiohttp import web

from ..gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
