"""What the Grafana dashboard shows, without Grafana: run a gateway under mixed load and chart its metrics.

    python bench/dashboard_snapshot.py [--seconds 20] [--out docs/dashboard.png]

Starts the demo-format upstream (every 10th call fails with 503) and a gateway (memory store) as processes
on loopback, drives successes, streams, 429s (a key on a tight rate-limit plan), 402s (a key with a tiny
budget) and 401s (an unknown key) for a fixed time, scrapes GET /metrics every second, computes the main
dashboard panels from the samples as PromQL would (rates over a 5 s window, histogram_quantile over
bucket rates) and renders them as a grid of line charts. Needs the `bench` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import time
from collections import Counter as Tally
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from relay import KEY, REPO_ROOT, upstream_and_gateway, wait_ready

TIGHT_KEY = "sk_bench_tight_" + "t" * 32
BROKE_KEY = "sk_bench_broke_" + "c" * 32
UNKNOWN_KEY = "sk_bench_unknown_" + "u" * 32
RATE_WINDOW_S = 5.0  # what Grafana's $__rate_interval comes to with a 1 s scrape interval
ROOMY = {"rate_limits": [{"per": "user", "requests": 10**9, "window": "1m"}],
         "budget": {"credits": 10**9, "period": "month", "scope": "account"}}
MAX_TOKENS = 64  # bounds each reservation: 1 + 64 output tokens at 20 per 1k = 2.28 credits


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# Plan `demo` (the demo key) never refuses; `tight` allows 3 requests a second; `tiny` has 60 credits in all.
POLICY = {
    "plans": {
        "demo": {"models": ["bench/*"], **ROOMY},
        "tight": {"models": ["bench/*"], **ROOMY, "rate_limits": [{"per": "key", "requests": 3, "window": "1s"}]},
        "tiny": {"models": ["bench/*"], **ROOMY, "budget": {"credits": 60, "period": "none", "scope": "key"}},
    },
    "prices": {"bench/chat": {"per_request": 1, "output_per_1k_tokens": 20}},
    "keys": [{"id": "tight", "hash": _hash(TIGHT_KEY), "plan": "tight"},
             {"id": "broke", "hash": _hash(BROKE_KEY), "plan": "tiny"}],
}

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]
Series = dict[str, list[float]]


@dataclass
class Scrape:
    t: float
    samples: Samples


# -- load ----------------------------------------------------------------------------------------------


@dataclass
class Caller:
    """One kind of traffic: a key, streaming or not, and a pause between its requests."""
    name: str
    key: str
    stream: bool
    pause_s: float
    workers: int = 1


CALLERS = (
    Caller("json", KEY, stream=False, pause_s=0.05, workers=2),
    Caller("stream", KEY, stream=True, pause_s=0.1, workers=4),
    Caller("tight", TIGHT_KEY, stream=False, pause_s=0.1),
    Caller("broke", BROKE_KEY, stream=False, pause_s=0.2),
    Caller("unknown", UNKNOWN_KEY, stream=False, pause_s=0.3),
)


async def drive(http: aiohttp.ClientSession, url: str, caller: Caller, deadline: float, seen: Tally) -> None:
    """Send `caller`'s requests until the deadline, reading every answer to the end; tally the statuses."""
    body = json.dumps({"model": "bench/chat", "stream": caller.stream, "max_tokens": MAX_TOKENS,
                       "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {caller.key}", "Content-Type": "application/json"}
    while time.monotonic() < deadline:
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            seen[response.status] += 1
        await asyncio.sleep(caller.pause_s)


async def scrape_every_second(http: aiohttp.ClientSession, url: str, deadline: float) -> list[Scrape]:
    """GET /metrics once a second until the deadline (and once after it)."""
    scrapes: list[Scrape] = []
    start = time.monotonic()
    while True:
        async with http.get(url) as response:
            scrapes.append(Scrape(time.monotonic() - start, parse_metrics(await response.text())))
        if time.monotonic() >= deadline:
            return scrapes
        await asyncio.sleep(1.0)


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- PromQL, the few functions the dashboard uses --------------------------------------------------------


def _grouped(samples: Samples, name: str, by: tuple[str, ...], where: dict[str, str]) -> dict[tuple[str, ...], float]:
    """sum by (by) (name{where})."""
    out: dict[tuple[str, ...], float] = {}
    for (sample_name, labels), value in samples.items():
        label_map = dict(labels)
        if sample_name == name and all(label_map.get(k) == v for k, v in where.items()):
            group = tuple(label_map.get(k, "") for k in by)
            out[group] = out.get(group, 0.0) + value
    return out


def _window_start(scrapes: list[Scrape], i: int) -> int:
    """Index of the oldest scrape within RATE_WINDOW_S before scrape i (at least one step back)."""
    j = i - 1
    while j > 0 and scrapes[i].t - scrapes[j - 1].t <= RATE_WINDOW_S:
        j -= 1
    return j


def rate(scrapes: list[Scrape], name: str, by: tuple[str, ...] = (), **where: str) -> list[dict[tuple[str, ...], float]]:
    """sum by (by) (rate(name{where}[5s])) at every scrape but the first; a series absent earlier counts as 0."""
    points = []
    for i in range(1, len(scrapes)):
        j = _window_start(scrapes, i)
        now, then = _grouped(scrapes[i].samples, name, by, where), _grouped(scrapes[j].samples, name, by, where)
        dt = scrapes[i].t - scrapes[j].t
        points.append({group: (value - then.get(group, 0.0)) / dt for group, value in now.items()})
    return points


def histogram_quantile(q: float, buckets: dict[tuple[str, ...], float]) -> float:
    """Prometheus' histogram_quantile over {(le,): cumulative rate}: linear within the bucket holding rank q."""
    bounds = sorted((float(le), value) for (le,), value in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return math.nan
    rank = q * bounds[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in bounds:
        if count >= rank:
            if math.isinf(upper_bound):  # rank in the +Inf bucket: the highest finite bound, as Prometheus does
                return lower_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


def quantiles(scrapes: list[Scrape], histogram: str) -> Series:
    """p50 / p95 / p99 of a histogram over all its label sets, in milliseconds."""
    bucket_rates = rate(scrapes, f"{histogram}_bucket", ("le",))
    return {f"p{round(q * 100)}": [histogram_quantile(q, point) * 1000 for point in bucket_rates] for q in (.5, .95, .99)}


def by_label(points: list[dict[tuple[str, ...], float]], scale: float = 1.0) -> Series:
    """Turn per-scrape groups into one line per group (missing -> 0), legend = label values joined."""
    groups = sorted({group for point in points for group in point})
    return {" ".join(group) or "total": [point.get(group, 0.0) * scale for point in points] for group in groups}


def gauge(scrapes: list[Scrape], name: str, legend: str, reduce: Callable[[list[float]], float] = sum) -> Series:
    """sum(name) (or another reduction) at every scrape but the first, aligned with the rates."""
    return {legend: [reduce([v for (n, _), v in s.samples.items() if n == name] or [math.nan]) for s in scrapes[1:]]}


PANELS: tuple[tuple[str, str, Callable[[list[Scrape]], Series]], ...] = (
    ("Requests by status class", "req/s",
     lambda s: by_label(rate(s, "edge_proxy_requests_total", ("status_class",)))),
    ("Request duration p50 / p95 / p99", "ms", lambda s: quantiles(s, "edge_proxy_request_duration_seconds")),
    ("Time to first byte p50 / p95 / p99", "ms", lambda s: quantiles(s, "edge_proxy_time_to_first_byte_seconds")),
    ("Errors by code", "errors/s", lambda s: by_label(rate(s, "edge_proxy_errors_total", ("code",)))),
    ("Upstream errors by provider, reason", "errors/s",
     lambda s: by_label(rate(s, "edge_proxy_upstream_errors_total", ("provider", "reason")))),
    ("Streams in flight", "streams", lambda s: gauge(s, "edge_proxy_streams_in_flight", "streams")),
    ("Credits burn by action", "credits/s", lambda s: by_label(rate(s, "edge_proxy_credits_total", ("action",)))),
    ("Denials by kind", "denials/s", lambda s: by_label(rate(s, "edge_proxy_denials_total", ("kind",)))),
    ("Store up (min)", "up", lambda s: gauge(s, "edge_proxy_store_up", "store", min)),
)


# -- output --------------------------------------------------------------------------------------------


def render(panels: list[tuple[str, str, Series]], times: list[float], out: Path, subtitle: str) -> None:
    """A 3-column grid of small line charts, one per panel, written as a PNG."""
    import matplotlib  # the `bench` extra; imported here so the load part runs without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 3.3 * rows), dpi=80, sharex=True)
    for ax, (title, unit, series) in zip(axes.flat, panels):
        for legend, values in series.items():
            ax.plot(times, values, label=legend, linewidth=1.6)
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_ylabel(unit, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        finite = [v for values in series.values() for v in values if v > 0]
        if finite and max(finite) > 20 * min(finite):  # e.g. p50 of quick answers beside p99 of streams
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_ylim(bottom=0, top=max(1.1, ax.get_ylim()[1]))
        if series:
            ax.legend(fontsize=8, loc="best", framealpha=0.7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=9)
    fig.suptitle("edge-proxy dashboard panels, computed from scraped GET /metrics (not a Grafana screenshot)",
                 fontsize=13, x=0.01, ha="left")
    fig.text(0.01, 0.945, subtitle, fontsize=9, ha="left", color="dimgray")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def print_table(panels: list[tuple[str, str, Series]], seen: Tally) -> None:
    """One line per chart line: its mean and peak over the run (NaN points, e.g. no traffic, skipped)."""
    print(f"\n{'panel':<38} {'series':<26} {'mean':>9} {'peak':>9}  unit")
    for title, unit, series in panels:
        for legend, values in series.items():
            finite = [v for v in values if not math.isnan(v)]
            mean = sum(finite) / len(finite) if finite else math.nan
            print(f"{title:<38} {legend:<26} {mean:>9.2f} {max(finite, default=math.nan):>9.2f}  {unit}")
    print("\nclient saw: " + ", ".join(f"{status}: {count}" for status, count in sorted(seen.items())))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()

    seen: Tally = Tally()
    with upstream_and_gateway(stream_chunks=30, policy=POLICY, fail_every=10, chunk_delay_ms=20) as running:
        base = f"http://127.0.0.1:{running.gateway_port}"
        await wait_ready(f"{base}/v1/chat/completions")
        deadline = time.monotonic() + args.seconds
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            scraping = asyncio.create_task(scrape_every_second(http, f"{base}/metrics", deadline))
            await asyncio.gather(*(drive(http, f"{base}/v1/chat/completions", caller, deadline, seen)
                                   for caller in CALLERS for _ in range(caller.workers)))
            scrapes = await scraping

    panels = [(title, unit, compute(scrapes)) for title, unit, compute in PANELS]
    times = [s.t for s in scrapes[1:]]
    mix = ", ".join(f"{c.name} x{c.workers}" for c in CALLERS)
    render(panels, times, args.out, f"{args.seconds:g} s of load on one gateway (memory store): {mix}; "
           f"every 10th upstream call fails; rates over {RATE_WINDOW_S:g} s windows")
    print_table(panels, seen)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
