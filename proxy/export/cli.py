"""`edge-proxy export`: the ledger exporter as its own process (a sidecar or a Deployment beside the gateway).

It reads the store section of the gateway's config.yaml (the ledger lives in Redis) and takes everything else
from flags; the HTTP sink's URL (it may carry credentials) and signing secret come from env or files only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from proxy.accesslog import configure_logging
from proxy.config import ConfigError, load_config
from proxy.event_loop import run_event_loop
from proxy.export.exporter import ExportSettings, Exporter
from proxy.export.sinks import HttpSink, JsonlSink, Sink
from proxy.store.redis_store import RedisStore
from proxy.store.settings import redis_store

log = logging.getLogger("proxy.export")

NAME = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
MIN_SECRET_BYTES = 16


def add_export_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = commands.add_parser(
        "export", help="drain the usage ledger into a sink (JSON lines or signed HTTP), at least once"
    )
    export.add_argument("--config", default="config.yaml", help="the gateway's config (its store: section)")
    export.add_argument("--sink", choices=("jsonl", "http"), required=True)
    export.add_argument("--out", help="jsonl: the file to append to, or - for stdout")
    export.add_argument("--url-env", help="http: the env var holding the URL to POST batches to")
    export.add_argument("--url-file", help="http: a file holding that URL")
    export.add_argument("--secret-env", help="http: the env var holding the HMAC-SHA256 signing secret")
    export.add_argument("--secret-file", help="http: a file holding that secret")
    export.add_argument("--http-timeout", type=float, default=10.0, help="http: seconds per POST (default 10)")
    defaults = ExportSettings()
    export.add_argument("--group", default=defaults.group, help="the consumer group (default %(default)s)")
    export.add_argument("--consumer", help="this exporter's name in the group (default: the host name)")
    export.add_argument("--batch-size", type=int, default=defaults.batch_size)
    export.add_argument("--poll-interval", type=float, default=defaults.poll_interval_s, help="seconds")
    export.add_argument("--discover-interval", type=float, default=defaults.discover_interval_s,
                        help="seconds between scans of every stream (rounds in between read the index)")
    export.add_argument("--claim-idle", type=float, default=defaults.claim_idle_s,
                        help="seconds after which another consumer's unacknowledged records are taken over")
    export.add_argument("--max-backoff", type=float, default=defaults.max_backoff_s, help="seconds")
    export.add_argument("--once", action="store_true", help="exit once nothing is left to export")
    export.set_defaults(run=_export)


def export_settings(args: argparse.Namespace) -> ExportSettings:
    """The loop's settings from the flags; ConfigError names the flag and the fix."""
    for flag in ("group", "consumer"):
        value = getattr(args, flag)
        if value is not None and not NAME.fullmatch(value):
            raise ConfigError(f"--{flag} {value!r}: use 1 to 128 letters, digits or . _ : @ -")
    if not 1 <= args.batch_size <= 10_000:
        raise ConfigError(f"--batch-size {args.batch_size}: use 1 to 10000")
    for flag in ("poll_interval", "discover_interval", "claim_idle", "max_backoff", "http_timeout"):
        value = getattr(args, flag)
        if not 0 < value <= 86_400:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: use a number of seconds above 0")
    consumer = args.consumer or socket.gethostname()
    return ExportSettings(
        group=args.group, consumer=consumer if NAME.fullmatch(consumer) else "exporter",
        batch_size=args.batch_size, poll_interval_s=args.poll_interval,
        discover_interval_s=args.discover_interval, claim_idle_s=args.claim_idle, max_backoff_s=args.max_backoff,
    )


def build_sink(args: argparse.Namespace) -> Sink:
    """The chosen sink, checked now: a path that cannot be written, a bad URL, a missing secret stop start-up."""
    if args.sink == "jsonl":
        if not args.out:
            raise ConfigError("--sink jsonl needs --out: a file to append to, or - for stdout")
        if args.out == "-":
            return JsonlSink(None)
        path = Path(args.out)
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: cannot append to it ({exc.strerror}); fix the path or its "
                              "permissions") from None
        return JsonlSink(path)
    url = _from_env_or_file("url", args.url_env, args.url_file).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url-{'env' if args.url_env else 'file'}: the URL must be http:// or https:// with a host")
    secret = _from_env_or_file("secret", args.secret_env, args.secret_file).strip().encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the signing secret is shorter than {MIN_SECRET_BYTES} bytes; "
                          "generate one with: openssl rand -hex 32")
    return HttpSink(url, secret, args.http_timeout)


def _from_env_or_file(what: str, env: str | None, file: str | None) -> str:
    if bool(env) == bool(file):
        raise ConfigError(f"--sink http needs exactly one of --{what}-env and --{what}-file")
    if env:
        value = os.environ.get(env, "")
        if not value.strip():
            raise ConfigError(f"--{what}-env names {env!r}, which is not set or empty; export it")
        return value
    try:
        return Path(file or "").read_text()
    except OSError as exc:
        raise ConfigError(f"--{what}-file {file}: cannot read it ({exc.strerror})") from None


def _export(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = config.store_settings()
    if store.kind != "redis":
        raise ConfigError(f"{args.config}: store.kind is {store.kind}; the memory store's ledger lives inside its "
                          "gateway process. The exporter reads it from Redis: set store.kind: redis")
    settings = export_settings(args)
    sink = build_sink(args)
    stop_logging = configure_logging(config.server.log_level, json=config.server.log_json, access_log=False,
                                     stream=sys.stderr)  # stdout may be the sink
    try:
        run_event_loop(_run(redis_store(store), sink, settings, args.once))
    finally:
        stop_logging()
    return 0


async def _run(store: RedisStore, sink: Sink, settings: ExportSettings, once: bool) -> None:
    exporter = Exporter(store, sink, settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, exporter.stop)
    log.info("ledger export: started (group %s, consumer %s)", settings.group, settings.consumer)
    try:
        counts = await exporter.run(once=once)
    finally:
        await sink.close()
        await store.close()
    log.info("ledger export: stopped (%d records in %d batches, %d failed tries, %d lost to trimming)",
             counts.exported, counts.batches, counts.failures, counts.lost)
