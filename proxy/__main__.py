"""Command line: `edge-proxy serve | check | export | keys new | keys admin-token | keys <admin verb>`."""

from __future__ import annotations

import argparse
import secrets
import sys

from .auth.api_keys import generate_key, hash_key
from .accesslog import configure_logging
from .admin_client import add_verbs
from .config import ConfigError, load_config
from .export.cli import add_export_command


def _serve(args: argparse.Namespace) -> int:
    from .server import serve
    from .workers import serve_workers, worker_count

    config = load_config(args.config)
    workers = worker_count(config, args.workers)
    stop_logging = configure_logging(
        config.server.log_level, json=config.server.log_json, access_log=config.server.access_log
    )
    try:
        if workers > 1:
            return serve_workers(config, args.host, args.port, workers)
        serve(config, args.host, args.port)
    finally:
        stop_logging()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _check(args: argparse.Namespace) -> int:
    """Validate config and policies together by building every part, without serving."""
    from .gateway import build_gateway

    config = load_config(args.config)
    gateway = build_gateway(config, announce=False)
    policy = gateway.policy.current
    print(
        f"{args.config}: OK ({len(config.models)} models, {len(config.providers)} providers, "
        f"{len(policy.plans)} plans, {len(policy.keys)} keys, policy {policy.version})"
    )
    return 0


def _new_key(args: argparse.Namespace) -> int:
    """A key for a plan that exists: a key naming an unknown plan would be refused by the next policy load."""
    from .policy.loader import PolicyError, load_policy

    config = load_config(args.config)
    try:
        plans = load_policy(config.path(config.policies.dir), config.catalog()).plans
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    if args.plan not in plans:
        raise ConfigError(
            f"{config.source}: plan {args.plan!r} is not defined in {config.policies.dir}/ (plans: "
            f"{', '.join(sorted(plans))}). Fix: use one of them, or add plans.{args.plan} to a policy file first"
        )
    key = generate_key()
    print(f"API key (shown once, store it now): {key}")
    print("Add to policies/*.yaml under keys:")
    print(f'  - {{id: {args.id}, hash: "{hash_key(key)}", plan: {args.plan}}}')
    return 0


def _new_admin_token(args: argparse.Namespace) -> int:
    """A new admin token and the hash to configure instead of the token itself (admin.token_sha256)."""
    token = "adm_" + secrets.token_urlsafe(32)
    print(f"admin token (shown once, store it now): {token}")
    print(f'config.yaml: admin: {{token_sha256: ["{hash_key(token)}"]}}  (or export it and set admin.token_env)')
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="edge-proxy", description="Edge AI gateway")
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default="config.yaml")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers", type=_positive,
        help="worker processes sharing the port (default: server.workers, else the cores available; "
        "1 with the memory store)",
    )
    serve.set_defaults(run=_serve)
    check = commands.add_parser("check", help="validate config and policies, then exit")
    check.add_argument("--config", default="config.yaml")
    check.set_defaults(run=_check)
    add_export_command(commands)
    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="print a new API key once and its policy line")
    new.add_argument("--plan", required=True)
    new.add_argument("--id", default="my-key")
    new.add_argument("--config", default="config.yaml", help="the config whose policies must define --plan")
    new.set_defaults(run=_new_key)
    admin_token = key_commands.add_parser("admin-token", help="print a new admin token once and its hash")
    admin_token.set_defaults(run=_new_admin_token)
    add_verbs(key_commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
