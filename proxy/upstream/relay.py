"""Relay: send the call upstream and stream the answer to the client as it arrives, reading usage on the side."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..errors import ApiError
from ..policy.types import Usage
from . import sse
from .body_usage import BodyUsage
from ..config import Timeouts
from .formats import PreparedBody, WireFormat, openai
from .formats.base import AnswerTranslation, StreamTranslator
from .providers import Provider
from .read_deadline import ReadDeadline

# Hop-by-hop headers (RFC 9110 7.6.1) and those the relay recomputes.
_DROP_RESPONSE_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Content-Length", "Content-Encoding", "Date", "Server",
        "Set-Cookie", "X-Request-Id",
    )
)
_FORWARD_REQUEST_HEADERS = ("Content-Type", "Accept", "Accept-Language", "User-Agent")
_MAX_REDIRECTS = 3  # allowed hops (providers.<name>.follow_redirects_to) before the call fails
_ONE_SEND_MAX_BYTES = 64 * 1024  # a plain answer up to this size (and of known length) leaves in one send
_READ_REST_S = 1.0  # how long the end of a delivered answer is awaited to keep its connection; else it is closed


@dataclass(slots=True)
class RelayOutcome:
    """What happened, for metering and records."""

    status: int = 0
    usage: Usage | None = None  # as the provider reported it
    seconds: float | None = None  # audio length measured from the answer, for per_second prices
    first_byte_s: float | None = None
    bytes_out: int = 0
    events_out: int = 0
    output_chunks: int = 0  # content-bearing stream chunks, the usage estimate when a stream is cut short
    completed: bool = False
    delivered: bool = False  # the client has the whole answer: a 200 even if it hangs up before the body's end
    abandoned: bool = False  # the client left while a provider had its call, before the answer's headers came
    error_code: str | None = None
    response: web.StreamResponse | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RelaySettings:
    keepalive_s: float  # 0 = no `: ping` comments


@dataclass(slots=True)
class OpenedCall:
    """An upstream call whose response headers arrived: where it went and what was sent."""

    provider: Provider
    upstream: aiohttp.ClientResponse
    prepared: PreparedBody
    ends_at: float  # event-loop time when the whole call must end (the provider's `total_s` from its start)


async def relay(
    request: web.Request,
    call: OpenedCall,
    settings: RelaySettings,
    outcome: RelayOutcome,
    extra_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Stream the opened call's answer back; fills `outcome` as it goes (also when cancelled)."""
    if call.prepared.translation is not None:
        return await _relay_translated(request, call, call.prepared.translation, settings, outcome, extra_headers)
    provider, upstream = call.provider, call.upstream
    is_sse = upstream.content_type == "text/event-stream"
    try:
        outcome.status = upstream.status
        if upstream.status >= 500:
            raise await upstream_failure(provider, upstream)
        response = _new_response(upstream, _response_headers(upstream, extra_headers), is_sse)
        outcome.response = response
        if is_sse:
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
        await response.prepare(request)
        chunks = read_chunks(upstream, provider.timeouts, settings.keepalive_s if is_sse else 0.0, call.ends_at)
        if is_sse:
            await _relay_events(response, chunks, provider.format, call.prepared.usage_injected, outcome)
        else:
            await _relay_body(response, chunks, upstream.content_type, provider.format, outcome)
        if outcome.error_code is not None and not is_sse:
            # Headers are sent and a plain body has no in-band error: cut the connection so the client
            # sees a truncated answer instead of a complete-looking one.
            if request.transport is not None:
                request.transport.close()
            return response
        outcome.completed = outcome.delivered = outcome.error_code is None
        upstream.release()  # before write_eof: a client that hangs up after the last byte cannot cost the connection
        await response.write_eof()
        return response
    except asyncio.CancelledError:
        if is_sse:
            await usage_from_the_rest(upstream, provider.format, outcome)
        raise
    finally:
        await release_or_close(upstream, outcome)


async def _relay_translated(
    request: web.Request,
    call: OpenedCall,
    translation: AnswerTranslation,
    settings: RelaySettings,
    outcome: RelayOutcome,
    extra_headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    """An answer in another dialect, translated for the client: a stream event by event as it arrives (never
    buffered), a JSON answer or an error answer whole (bounded)."""
    provider, upstream = call.provider, call.upstream
    try:
        outcome.status = upstream.status
        if upstream.status >= 500:
            raise await upstream_failure(provider, upstream)
        chunks = read_chunks(upstream, provider.timeouts, settings.keepalive_s if call.prepared.stream else 0.0,
                             call.ends_at)
        if upstream.status != 200 or not call.prepared.stream:
            body = await _whole_body(chunks)
            error_type = upstream.headers.get("x-amzn-ErrorType", "")
            if upstream.status == 200:
                data, outcome.usage = translation.answer(body)
            else:
                data = translation.error(upstream.status, error_type, body)
            response = web.StreamResponse(status=upstream.status, headers=_retry_after(upstream, extra_headers))
            response.content_type, response.content_length = "application/json", len(data)
            outcome.response = response
            await response.prepare(request)
            await _write(response, data, outcome)
        else:
            response = web.StreamResponse(status=200, headers=extra_headers)
            response.content_type = "text/event-stream"
            response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            outcome.response = response
            await response.prepare(request)
            await _relay_translated_events(response, chunks, translation.stream(), outcome)
        outcome.completed = outcome.delivered = outcome.error_code is None
        upstream.release()
        await response.write_eof()
        return response
    finally:
        await release_or_close(upstream, outcome)


def _retry_after(upstream: aiohttp.ClientResponse, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The response's headers, with the provider's Retry-After (a 429 says when to come back)."""
    retry_after = upstream.headers.get("Retry-After")
    return {**(headers or {}), **({"Retry-After": retry_after} if retry_after else {})}


_MAX_TRANSLATED_ANSWER = 16 * 1024 * 1024  # a JSON answer is translated whole: no provider's chat answer is larger


async def _whole_body(chunks: AsyncIterator[bytes | None]) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk or b""
        if len(body) > _MAX_TRANSLATED_ANSWER:
            raise ApiError("upstream_error", "the provider's answer is too large to translate")
    return bytes(body)


async def _relay_translated_events(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes | None],
    stream: StreamTranslator,
    outcome: RelayOutcome,
) -> None:
    """Each upstream piece's translated events written at once; usage and output counted as they come. A failure
    ends the stream with an error event in OpenAI's shape: translated answers are for OpenAI chat clients."""
    try:
        async for chunk in chunks:
            data = sse.comment("ping") if chunk is None else stream.feed(chunk)
            outcome.usage, outcome.output_chunks = stream.usage, stream.output_chunks
            await _write(response, data, outcome)
            if stream.done:
                break
        if stream.error is not None:
            outcome.error_code = "upstream_error"
        elif not stream.done:
            raise ApiError("upstream_error", "the provider closed the stream before it finished")
    except ApiError as exc:
        outcome.error_code = exc.code
        await _write(response, openai.error_event(exc), outcome)


async def usage_from_the_rest(upstream: aiohttp.ClientResponse, fmt: WireFormat, outcome: RelayOutcome) -> None:
    """The client left a stream before its usage event: that event follows the last content chunk (and counts what
    no chunk shows, such as reasoning), so read what is left of the stream for a moment to charge it rather than an
    estimate. Output events read meanwhile count too: the provider produced them."""
    if (outcome.usage is not None and outcome.usage.final) or outcome.error_code is not None:
        return
    splitter = sse.EventSplitter()
    try:
        async with asyncio.timeout(_READ_REST_S):
            while chunk := await upstream.content.readany():
                for event in splitter.feed(chunk):
                    _inspect_event(event, fmt, False, outcome)
    except (TimeoutError, aiohttp.ClientError):
        pass


async def release_or_close(upstream: aiohttp.ClientResponse, outcome: RelayOutcome) -> None:
    """A delivered answer's connection goes back to the pool once its body has ended (what is left, such as the
    end of a chunked body after `[DONE]`, is read for a moment); anything else is closed, never reused."""
    try:
        if outcome.delivered and not upstream.content.at_eof():
            async with asyncio.timeout(_READ_REST_S):
                while await upstream.content.readany():
                    pass
    except (TimeoutError, aiohttp.ClientError):
        pass
    finally:
        if outcome.delivered and upstream.content.at_eof():
            upstream.release()
        else:
            upstream.close()


def forwarded_headers(request: web.Request, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The client's headers that the upstream may see (never its credential); `extra`: a wire format's own
    (e.g. `anthropic-version`)."""
    return {h: v for h in (*_FORWARD_REQUEST_HEADERS, *extra) if (v := request.headers.get(h))}


async def open_upstream(
    provider: Provider, url: str, body: bytes, request_id: str, forward: Mapping[str, str]
) -> aiohttp.ClientResponse:
    """POST to the provider's `url` (Provider.url) and wait (up to `first_byte_s`) for its response headers."""
    headers = CIMultiDict(forward)
    headers["X-Request-Id"] = request_id
    provider.inject_trace(headers)
    try:
        async with asyncio.timeout(provider.timeouts.first_byte_s):
            return await _post_with_a_key(provider, URL(url), body, headers)
    except TimeoutError:
        raise ApiError(
            "upstream_timeout",
            f"provider {provider.name} did not answer within {provider.timeouts.first_byte_s:g}s",
        ) from None
    except aiohttp.ClientConnectorError:
        raise ApiError("generation_unavailable", f"provider {provider.name} is unreachable; try again later") from None
    except aiohttp.ClientError as exc:
        raise ApiError("upstream_error", f"provider {provider.name} failed: {type(exc).__name__}") from None


async def _post_with_a_key(
    provider: Provider, url: URL, body: bytes, headers: CIMultiDict[str]
) -> aiohttp.ClientResponse:
    """POST signed (SigV4) or with one of the provider's keys; a key refused (401) or throttled (429) rests, and
    the call is sent again with another key that is not resting (each key at most once)."""
    keys = provider.keys
    if provider.signer is not None:
        headers["Content-Type"] = "application/json"
        headers.update(provider.signer.sign(str(url), headers, body))  # over the URL as it will be sent
    if keys is None:
        return await _post_following_allowed_redirects(provider, url, body, headers)
    tries = len(keys)
    while True:
        tries -= 1
        chosen = keys.choose()
        headers.update(chosen.headers)
        response = await _post_following_allowed_redirects(provider, url, body, headers)
        if not keys.refused(chosen, response.status, response.headers.get("Retry-After")) or tries == 0:
            return response
        response.release()


async def _post_following_allowed_redirects(
    provider: Provider, url: URL, body: bytes, headers: CIMultiDict[str]
) -> aiohttp.ClientResponse:
    """POST without letting aiohttp follow redirects; a redirect the provider's policy allows is re-sent as is."""
    for _ in range(_MAX_REDIRECTS + 1):
        response = await provider.session.post(url, data=body, headers=headers, allow_redirects=False)
        if not 300 <= response.status < 400:
            return response
        response.release()
        location = response.headers.get("Location")
        target = url.join(URL(location)) if location else None
        if target is None or not provider.redirects.allows(response.status, url, target):
            raise ApiError(
                "upstream_error",
                f"provider {provider.name} answered a redirect ({response.status}) that is not followed; "
                "allow its host in providers.<name>.follow_redirects_to if it is trusted",
                upstream_status=response.status,
            )
        url = target
    raise ApiError("upstream_error", f"provider {provider.name} redirected more than {_MAX_REDIRECTS} times")


async def upstream_failure(provider: Provider, upstream: aiohttp.ClientResponse) -> ApiError:
    """An `upstream_error` carrying the provider's status and the start of its error body."""
    try:
        async with asyncio.timeout(provider.timeouts.idle_s):
            detail = (await upstream.content.read(2048)).decode(errors="replace")
    except (TimeoutError, aiohttp.ClientError):
        detail = ""
    return ApiError(
        "upstream_error",
        f"provider {provider.name} answered {upstream.status}",
        upstream_status=upstream.status,
        upstream_message=detail[:500],
    )


def _response_headers(upstream: aiohttp.ClientResponse, extra: Mapping[str, str] | None) -> CIMultiDict[str]:
    # Access-Control-*: only the gateway's own CORS stamp (app.py) says which origins may read an answer.
    headers = CIMultiDict([
        (k, v) for k, v in upstream.headers.items()
        if (name := k.lower()) not in _DROP_RESPONSE_HEADERS and not name.startswith("access-control-")
    ])
    if extra:
        headers.update(extra)
    return headers


def _new_response(upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], is_sse: bool) -> web.StreamResponse:
    """A plain answer of a small known length leaves in one send, its headers with its body and no chunked end
    (aiohttp's Response holds the headers until the first write); anything else streams: headers first, then each
    chunk as it arrives. The length must be the body's as relayed: not when the client session decompresses it."""
    length = upstream.content_length
    if (not is_sse and length is not None and length <= _ONE_SEND_MAX_BYTES
            and upstream.headers.get("Content-Encoding", "identity").lower() == "identity"):
        headers["Content-Length"] = str(length)
        return web.Response(status=upstream.status, headers=headers)
    return web.StreamResponse(status=upstream.status, headers=headers)


def stream_deadline(provider: Provider) -> float:
    """When a call starting now must end (event-loop time): the provider's `total_s` from now."""
    return asyncio.get_running_loop().time() + provider.timeouts.total_s


async def read_chunks(
    upstream: aiohttp.ClientResponse, timeouts: Timeouts, keepalive_s: float, ends_at: float
) -> AsyncIterator[bytes | None]:
    """Upstream chunks as they arrive; None when `keepalive_s` passes without one (time to send a ping).

    Every read deadline is enforced here: `idle_s` between chunks and the whole call's `ends_at`. A timeout
    that is not this loop's own wait is a failure, never a quiet moment (else a stuck read spins the loop).
    """
    loop = asyncio.get_running_loop()
    deadline = ReadDeadline()
    idle_until = loop.time() + timeouts.idle_s
    try:
        while True:
            now = loop.time()
            if now >= ends_at:
                raise ApiError("upstream_timeout", f"the provider's answer took longer than {timeouts.total_s:g}s")
            if now >= idle_until:
                raise ApiError("upstream_timeout", f"no data from the provider for {timeouts.idle_s:g}s")
            give_up_at = min(idle_until, ends_at)
            wake_at = min(give_up_at, now + keepalive_s) if keepalive_s else give_up_at
            deadline.arm(wake_at)
            try:
                chunk = await upstream.content.readany()
            except asyncio.CancelledError:
                if not deadline.expired():
                    raise
                chunk = None  # the deadline passed: a ping is due, or the checks above end the stream
            except TimeoutError:
                raise ApiError("upstream_timeout", "the connection to the provider timed out") from None
            except aiohttp.ClientPayloadError:
                raise ApiError("upstream_error", "the provider closed the stream before it finished") from None
            finally:
                deadline.disarm()  # the consumer handles the chunk in this task: no deadline may land there
            if chunk is None:
                if wake_at < give_up_at:
                    yield None  # a quiet moment: time for a keep-alive ping
            elif not chunk:
                return
            else:
                idle_until = loop.time() + timeouts.idle_s
                yield chunk
    finally:
        deadline.close()


async def _relay_events(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes | None],
    fmt: WireFormat,
    drop_usage_event: bool,
    outcome: RelayOutcome,
) -> None:
    """Write each whole SSE event as soon as it is complete; note usage; end with an error event on failure."""
    splitter = sse.EventSplitter()
    try:
        async for chunk in chunks:
            if chunk is None:
                if splitter.at_boundary:
                    await _write(response, fmt.keepalive, outcome)
                continue
            kept = [event for event in splitter.feed(chunk) if _inspect_event(event, fmt, drop_usage_event, outcome)]
            if kept:
                outcome.events_out += len(kept)
                await _write(response, kept[0] if len(kept) == 1 else b"".join(kept), outcome)
                # Clients stop at the stream's last event (`[DONE]`) and may hang up before the upstream's body has
                # ended.
                outcome.delivered = outcome.delivered or any(fmt.ends_stream(event) for event in kept)
        rest = splitter.flush()  # a last event without its blank line still counts, usage included
        if rest and _inspect_event(rest, fmt, drop_usage_event, outcome):
            await _write(response, rest, outcome)
    except ApiError as exc:
        outcome.error_code = exc.code
        splitter.flush()  # a partial event never reached the client; drop it so framing stays whole
        # The status line is gone: the format's in-stream error is what its SDKs surface.
        await _write(response, fmt.error_event(exc), outcome)


def _inspect_event(event: bytes, fmt: WireFormat, drop_usage_event: bool, outcome: RelayOutcome) -> bool:
    """Read usage from an event; False if the event must not reach the client.

    Byte checks first: only the rare event that carries a usage object is parsed as JSON.
    """
    if fmt.is_output_event(event):
        outcome.output_chunks += 1
    chunk = sse.event_json(event) if drop_usage_event and fmt.may_carry_usage(event) else None
    outcome.usage = fmt.event_usage(outcome.usage, event, chunk)
    return chunk is None or not fmt.is_injected_usage_event(chunk)


async def _relay_body(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes | None],
    content_type: str,
    fmt: WireFormat,
    outcome: RelayOutcome,
) -> None:
    reader = BodyUsage(content_type, fmt)
    try:
        async for chunk in chunks:
            if chunk is None:
                continue
            await _write(response, chunk, outcome)
            reader.feed(chunk)
    except ApiError as exc:
        outcome.error_code = exc.code
    finally:
        # Read from what was received, even if cut: a client may hang up holding the whole answer (its usage
        # included) before the upstream's body has formally ended; an answer cut short does not parse.
        outcome.seconds = reader.seconds()
        outcome.usage = reader.usage() or outcome.usage  # else what the answer's headers stated (ElevenLabs)


async def _write(response: web.StreamResponse, data: bytes, outcome: RelayOutcome) -> None:
    if data:
        await response.write(data)
        outcome.bytes_out += len(data)
