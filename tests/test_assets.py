"""The shared asset store: signed URLs, presigned uploads, and the redis backend served by every replica."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import botocore.session
import pytest
import redis
import redis.asyncio as aioredis
from aiobotocore.session import get_session
from aiohttp import web

from proxy.assets import AssetExists, MemoryAssets, RehostError, build_assets
from proxy.assets.base import new_asset_id
from proxy.assets.rehost import Rehoster
from proxy.assets.redis import RedisAssets
from proxy.assets.s3 import S3Assets
from proxy.assets.signing import UrlSigner
from proxy.config import AssetSettings, ConfigError, RehostSettings, S3Settings, parse_config
from proxy.errors import ApiError
from proxy.server import RunningServer

from .gateway_harness import TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider, serve_on_loopback
from .redis_server import free_port
from .test_responses import generate

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
URL_KEY = "k" * 48
PUBLIC_URL = "https://ai.example.com"  # what clients reach, never a replica's own address


@pytest.fixture
def flushed_redis(redis_url: str) -> str:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


def shared_config(provider: MockProvider, policies_dir: Path, backend: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A replica's config: assets on `backend` (its `assets` keys and, for redis, its `store`), URLs signed with
    the key in ASSET_URL_KEY, a public URL that is not this replica's address."""
    assets = {"url_signing_keys": [{"env": "ASSET_URL_KEY"}], **backend["assets"], **overrides.pop("assets", {})}
    return gateway_config(provider.url, policies_dir, assets=assets, store=backend.get("store", {}),
                          server={"max_upload_bytes": 4096, "public_url": PUBLIC_URL}, **overrides)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (moto's) in its own process on a loopback port; its endpoint URL."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert process.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=5)
        log.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A new bucket on the S3 server, credentials in the environment (the AWS chain); the backend's settings."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"assets-{secrets.token_hex(6)}"
    botocore.session.get_session().create_client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return {"bucket": bucket, "prefix": "gw/", "endpoint_url": s3_server, "region": "us-east-1",
            "addressing_style": "path"}


@pytest.fixture(params=["redis", "s3"])
async def replicas(
    request: pytest.FixtureRequest, provider: MockProvider, gateway_env: None, policies_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[str, str]]:
    """Two gateways sharing an asset backend: redis (with the metering store) or s3."""
    monkeypatch.setenv("ASSET_URL_KEY", URL_KEY)
    if request.param == "redis":
        backend = {"store": {"kind": "redis", "redis_url": request.getfixturevalue("flushed_redis")},
                   "assets": {"backend": "redis"}}
    else:
        backend = {"assets": {"backend": "s3", "s3": request.getfixturevalue("s3_bucket")}}
    servers: list[RunningServer] = [await start_gateway(shared_config(provider, policies_dir, backend)) for _ in range(2)]
    yield servers[0].url, servers[1].url
    for server in servers:
        await server.stop()


def on(replica: str, url: str) -> str:
    """`url` (issued by any replica) sent to `replica`: as a load balancer would pick one."""
    parts = urlsplit(url)
    return f"{replica}{parts.path}?{parts.query}"


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {**dict(parse_qsl(parts.query)), **changes}
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


async def fetch(url: str) -> tuple[int, bytes | str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, (await r.json())["error"]["code"] if r.status >= 400 else await r.read()


async def post_upload(gateway: str, **kwargs: Any) -> tuple[int, Any]:
    kwargs["headers"] = {**AUTH, **kwargs.get("headers", {})}
    async with aiohttp.ClientSession() as http, http.post(f"{gateway}/v1/uploads", **kwargs) as r:
        return r.status, await r.json()


async def put(url: str, data: bytes, content_type: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.put(url, data=data, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json()


async def presign(gateway: str, size: int, content_type: str = "image/png") -> tuple[int, Any]:
    return await post_upload(gateway, json={"filename": "cat.png", "content_type": content_type, "size": size})


async def test_an_asset_stored_on_one_replica_is_served_by_the_other(replicas: tuple[str, str]) -> None:
    a, b = replicas
    status, raw = await post_upload(a, data=PNG, headers={"Content-Type": "image/png"})
    assert status == 200 and raw["url"].startswith(f"{PUBLIC_URL}/v1/assets/")
    assert await fetch(on(b, raw["url"])) == (200, PNG)
    status, offer = await presign(a, len(PNG))
    assert status == 200 and offer["method"] == "PUT" and offer["headers"] == {"Content-Type": "image/png"}
    assert offer["upload_url"].startswith(f"{PUBLIC_URL}/v1/uploads/") and offer["asset_url"].startswith(PUBLIC_URL)
    assert await fetch(on(b, offer["asset_url"])) == (404, "not_found")  # nothing uploaded yet
    status, stored = await put(on(b, offer["upload_url"]), PNG, "image/png")
    assert (status, stored["bytes"]) == (200, len(PNG))
    assert await fetch(on(a, offer["asset_url"])) == (200, PNG)
    assert await fetch(on(b, stored["url"])) == (200, PNG)


async def test_tampered_retargeted_or_extended_urls_are_refused(replicas: tuple[str, str]) -> None:
    a, b = replicas
    first = (await post_upload(a, data=PNG, headers={"Content-Type": "image/png"}))[1]["url"]
    other = (await post_upload(a, data=b"other", headers={"Content-Type": "image/gif"}))[1]["url"]
    query = dict(parse_qsl(urlsplit(first).query))
    sig = query["sig"]
    forged = [
        with_query(first, sig=("A" if sig[0] != "A" else "B") + sig[1:]),  # one character changed
        with_query(first, exp=str(int(query["exp"]) + 3600)),  # kept alive longer
        on(a, other.split("?")[0] + "?" + urlsplit(first).query),  # first's signature on another asset
        first.split("?")[0],  # no signature at all
        with_query(first, exp="1e99"),
    ]
    for url in forged:
        assert await fetch(on(b, url)) == (403, "invalid_asset_signature"), url


async def test_presigned_uploads_keep_to_their_signed_type_size_and_single_use(replicas: tuple[str, str]) -> None:
    a, b = replicas
    assert (await presign(a, 4097))[1]["error"] == {
        "code": "payload_too_large", "message": "a file of 4097 bytes exceeds the upload limit of 4096 bytes",
        "type": "invalid_request_error", "max_bytes": 4096}
    for content_type in ("text/html", "image/png; charset=x", "image/", "image/png\nX: y"):
        assert (await presign(a, 10, content_type))[1]["error"]["code"] == "unsupported_media_type", content_type
    for bad in ({"content_type": "image/png"}, {"content_type": "image/png", "size": "10"},
                {"content_type": "image/png", "size": True}, {"size": 10},
                {"content_type": "image/png", "size": 10, "filename": ["x"]}):
        status, answer = await post_upload(a, json=bad)
        assert (status, answer["error"]["code"]) == (400, "invalid_request"), bad
    status, offer = await presign(a, 100)
    url = on(b, offer["upload_url"])
    assert (await put(url, b"x" * 101, "image/png"))[1]["error"]["code"] == "payload_too_large"
    assert (await put(url, b"x" * 50, "image/svg+xml"))[1]["error"]["code"] == "unsupported_media_type"
    assert (await put(with_query(url, size="100000"), b"x" * 101, "image/png"))[1]["error"]["code"] == "invalid_asset_signature"
    assert (await put(with_query(url, acct="tenant-b"), b"x", "image/png"))[1]["error"]["code"] == "invalid_asset_signature"
    assert (await put(url, b"x" * 100, "image/png"))[0] == 200
    assert (await put(url, b"y" * 100, "image/png"))[:1] == (409,)
    assert await fetch(on(a, offer["asset_url"])) == (200, b"x" * 100)  # the first upload stands


async def test_an_uploaded_asset_url_is_fetched_by_the_provider(replicas: tuple[str, str], provider: MockProvider) -> None:
    """The asset URL a presigned upload gives is a model input a provider can fetch with no credential."""
    a, b = replicas
    offer = (await presign(a, len(PNG)))[1]
    assert (await put(on(b, offer["upload_url"]), PNG, "image/png"))[0] == 200
    image_url = on(b, offer["asset_url"])

    async def fetches_the_image(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            seen = hashlib.sha256(await r.read()).hexdigest()
        return web.json_response({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": seen}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}})

    provider.handler = fetches_the_image
    content = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": image_url}}]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a}/v1/chat/completions", headers=AUTH,
                             json={"model": "mock/chat", "messages": [{"role": "user", "content": content}]}) as r:
            answer = await r.json()
    assert answer["choices"][0]["message"]["content"] == hashlib.sha256(PNG).hexdigest()


def test_signatures_are_checked_before_expiry_and_old_keys_still_verify() -> None:
    now = [1000.0]
    old, new = b"o" * 32, b"n" * 32
    signer = UrlSigner((new, old), lambda: now[0])
    issued_before_rotation = UrlSigner((old,)).sign(("get", "id", 1010))
    signer.verify(("get", "id", 1010), issued_before_rotation, 1010)
    signer.verify(("get", "id", 1010), signer.sign(("get", "id", 1010)), 1010)
    now[0] = 1010.0
    with pytest.raises(ApiError) as expired:
        signer.verify(("get", "id", 1010), signer.sign(("get", "id", 1010)), 1010)
    assert (expired.value.status, expired.value.code) == (410, "asset_url_expired")
    with pytest.raises(ApiError) as extended:
        signer.verify(("get", "id", 2000), signer.sign(("get", "id", 1010)), 2000)
    assert (extended.value.status, extended.value.code) == (403, "invalid_asset_signature")
    with pytest.raises(ApiError):  # a get URL's signature does not authorise an upload
        signer.verify(("put", "id", 2000), signer.sign(("get", "id", 2000)), 2000)


async def test_redis_backend_keeps_each_accounts_share_atomically(flushed_redis: str) -> None:
    settings = AssetSettings(max_count_per_account=3, max_bytes_per_account=10, max_count=10, max_total_bytes=100)
    store = RedisAssets(settings, flushed_redis)
    try:
        kept = await store.put(b"b" * 10, "image/png", "tenant-b")
        flood = [await store.put(b"a", "image/png", "tenant-a") for _ in range(20)]
        assert [await store.get(asset.id) is not None for asset in flood[-4:]] == [False, True, True, True]
        big = await store.put(b"a" * 9, "image/png", "tenant-a")  # 9 + the newest 1 fit in 10: the others go
        assert [await store.get(x.id) is not None for x in (*flood[-3:], big)] == [False, False, True, True]
        got = await store.get(kept.id)
        assert got is not None and (got.data, got.content_type, got.account) == (b"b" * 10, "image/png", "tenant-b")
        with pytest.raises(ValueError):
            await store.put(b"x" * 11, "image/png", "tenant-a")
        with pytest.raises(AssetExists):
            await store.put(b"again", "image/png", "tenant-b", kept.id)
        await store.delete(kept.id)
        assert await store.get(kept.id) is None
        async with aioredis.from_url(flushed_redis) as client:  # the share's entries went with the asset
            assert await client.keys("edge_proxy:assets:*tenant-b*") == [b"edge_proxy:assets:{df6b6a5f}:tenant-b:seq"]
    finally:
        await store.close()


@pytest.mark.parametrize(("assets", "store", "says"), [
    ({"backend": "redis"}, {"kind": "redis", "redis_url": "redis://127.0.0.1:1/0"}, "url_signing_keys"),
    ({"backend": "redis", "url_signing_keys": [{"env": "ASSET_URL_KEY"}]}, {}, "store.kind: redis"),
    ({"backend": "s3", "url_signing_keys": [{"env": "ASSET_URL_KEY"}]}, {}, "needs an s3 section"),
    ({"url_signing_keys": [{"env": "A", "file": "b"}]}, {}, "exactly one of file or env"),
    ({"ttl_s": 60, "url_ttl_s": 120}, {}, "url_ttl_s (120.0) exceeds ttl_s"),
])
def test_asset_config_mistakes_stop_start_up(assets: dict[str, Any], store: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_config({"assets": assets, "store": store}, "config.yaml")


def test_a_short_or_missing_url_key_stops_start_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASSET_URL_KEY", "short")
    with pytest.raises(ConfigError, match=r"assets.url_signing_keys\[0\]: the key has 5 bytes, fewer than 32"):
        build_assets(parse_config({"assets": {"url_signing_keys": [{"env": "ASSET_URL_KEY"}]}}, "config.yaml"))
    with pytest.raises(ConfigError, match=r"url_signing_keys\[0\]: cannot read .*missing.key"):
        build_assets(parse_config({"assets": {"url_signing_keys": [{"file": str(tmp_path / "missing.key")}]}}, "c.yaml"))


async def test_s3_backend_refuses_expired_and_foreign_objects(s3_bucket: dict[str, Any]) -> None:
    now = [1000.0]
    settings = AssetSettings(backend="s3", s3=s3_bucket, ttl_s=60, url_signing_keys=[{"env": "ASSET_URL_KEY"}])
    store = S3Assets(settings, S3Settings(**s3_bucket), clock=lambda: now[0])
    try:
        asset = await store.put(PNG, "image/png", "acme")
        got = await store.get(asset.id)
        assert got is not None and (got.data, got.content_type, got.account, got.expires_at) == (PNG, "image/png", "acme", 1060)
        with pytest.raises(AssetExists):
            await store.put(b"other", "image/png", "acme", asset.id)
        now[0] = 1060.0  # past its expiry: refused although the bucket still holds it until its lifecycle rule runs
        assert await store.get(asset.id) is None
        async with get_session().create_client("s3", endpoint_url=s3_bucket["endpoint_url"]) as client:
            await client.put_object(Bucket=s3_bucket["bucket"], Key="gw/" + "0" * 30, Body=b"<script>")
        assert await store.get("0" * 30) is None  # an object the gateway did not store is never served
        await store.delete(asset.id)
        now[0] = 1000.0
        assert await store.get(asset.id) is None
    finally:
        await store.close()


@pytest.fixture
async def output_host() -> AsyncIterator[str]:
    """A provider's output host on loopback: /img.png, /page (HTML), /big.png, /to?url= (a 302 to `url`)."""
    def answer(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type)
        return handle

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    app = web.Application()
    app.router.add_get("/img.png", answer(PNG, "image/png"))
    app.router.add_get("/page", answer(b"<html>", "text/html"))
    app.router.add_get("/big.png", answer(b"x" * 5000, "image/png"))
    app.router.add_get("/to", redirect)
    runner, url = await serve_on_loopback(app)
    yield url
    await runner.cleanup()


async def test_provider_outputs_are_rehosted_into_the_shared_store(
    provider: MockProvider, gateway_env: None, policies_dir: Path, output_host: str, s3_bucket: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With rehost on, an image URL the provider answers becomes the gateway's own signed URL, on every replica."""
    monkeypatch.setenv("ASSET_URL_KEY", URL_KEY)
    backend = {"assets": {"backend": "s3", "s3": s3_bucket, "rehost": {"enabled": True, "private_hosts": ["127.0.0.1"]}}}
    config = shared_config(provider, policies_dir, backend)

    async def answers_a_url(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"created": 1, "data": [{"url": f"{output_host}/to?url=/img.png"}]})

    provider.handler = answers_a_url
    servers = [await start_gateway(config) for _ in range(2)]
    try:
        _, events = await generate(servers[0].url, {"model": "mock/image", "prompt": "a cat"})
        name, data = events[-1]
        assert name == "generation.completed" and data["output"]["url"].startswith(f"{PUBLIC_URL}/v1/assets/")
        assert await fetch(on(servers[1].url, data["output"]["url"])) == (200, PNG)
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.parametrize(("path", "exempt", "says"), [
    ("/img.png", (), "only https URLs"),  # plain http, not exempt
    ("/page", ("127.0.0.1",), "not an image, audio or video"),
    ("/big.png", ("127.0.0.1",), "exceeds 4096 bytes"),
    ("/to?url=https://10.1.2.3/x.png", ("127.0.0.1",), "10.1.2.3 is not a public address"),
    ("/to?url=https://localhost:1/x.png", ("127.0.0.1",), "localhost resolves to a non-public address"),
    ("/to?url=http://example.com/x.png", ("127.0.0.1",), "only https URLs"),
    ("/to?url=/to%3Furl%3D/img.png", ("127.0.0.1",), "redirects"),
])
async def test_rehost_refuses_private_plain_or_oversized_sources(
    output_host: str, path: str, exempt: tuple[str, ...], says: str
) -> None:
    settings = RehostSettings(enabled=True, private_hosts=exempt, max_redirects=1)
    rehoster = Rehoster(settings, MemoryAssets(AssetSettings()), max_bytes=4096)
    try:
        with pytest.raises(RehostError, match=re.escape(says)):
            await rehoster.rehost(output_host + path, "acme")
        with pytest.raises(RehostError, match="127.0.0.2 is not a public address"):
            await rehoster.rehost("https://127.0.0.2/x.png", "acme")
    finally:
        await rehoster.close()


async def test_a_failed_rehost_passes_the_providers_url_on(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    config = gateway_config(provider.url, policies_dir, assets={"rehost": {"enabled": True}})
    server = await start_gateway(config)
    try:  # the mock answers http://127.0.0.1/img.png: neither https nor public, so it is not fetched
        _, events = await generate(server.url, {"model": "mock/image", "prompt": "a cat"})
        assert events[-1] == ("generation.completed", {"output": {"url": "http://127.0.0.1/img.png",
                                                                  "urls": ["http://127.0.0.1/img.png"]}})
    finally:
        await server.stop()


async def test_a_browser_may_put_a_presigned_upload_cross_origin(gateway: str) -> None:
    """The seeds' web clients upload from the page's origin: the preflight for the PUT must allow it."""
    offer = (await presign(gateway, len(PNG)))[1]
    origin = {"Origin": "https://app.example.com"}
    async with aiohttp.ClientSession() as http:
        async with http.options(offer["upload_url"], headers={
                **origin, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"}) as r:
            assert r.status == 204 and "PUT" in r.headers["Access-Control-Allow-Methods"].split(", ")
        async with http.put(offer["upload_url"], data=PNG, headers={**origin, "Content-Type": "image/png"}) as r:
            assert (r.status, r.headers["Access-Control-Allow-Origin"]) == (200, "https://app.example.com")


@pytest.fixture
async def breaking_s3() -> AsyncIterator[str]:
    """An S3 endpoint whose GetObject sends the headers of a 100 000-byte object, 1000 bytes, then hangs up."""
    async def get_object(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "image/png", "Content-Length": "100000", "ETag": '"x"',
            "x-amz-meta-account": "acme", "x-amz-meta-expires": f"{time.time() + 60:.3f}"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/{bucket}/{key:.*}", get_object)
    runner, url = await serve_on_loopback(app)
    yield url
    await runner.cleanup()


async def test_an_object_cut_mid_read_is_an_incomplete_answer_not_a_complete_one(
    provider: MockProvider, gateway_env: None, policies_dir: Path, breaking_s3: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes are streamed from S3 as they come: a backend that breaks mid-object cuts the client's connection
    short of its Content-Length (never a truncated file that looks whole, never a second answer)."""
    monkeypatch.setenv("ASSET_URL_KEY", URL_KEY)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    s3 = {"bucket": "bucket", "prefix": "gw/", "endpoint_url": breaking_s3, "region": "us-east-1", "addressing_style": "path"}
    server = await start_gateway(shared_config(provider, policies_dir, {"assets": {"backend": "s3", "s3": s3}}))
    try:
        asset_id = new_asset_id("acme")
        expires = int(time.time()) + 60
        signature = UrlSigner((URL_KEY.encode(),)).sign(("get", asset_id, expires))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/v1/assets/{asset_id}?exp={expires}&sig={signature}") as r:
                assert (r.status, r.content_length) == (200, 100000)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
    finally:
        await server.stop()
