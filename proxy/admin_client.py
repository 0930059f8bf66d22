"""`edge-proxy keys create | list | get | disable | enable | rotate | set | topup`: the admin API over HTTP.

The gateway's URL comes from `--url` or EDGE_PROXY_URL; the admin token from EDGE_PROXY_ADMIN_TOKEN or
`--token-file` (never a flag: command lines are visible to other users of the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

URL_ENV = "EDGE_PROXY_URL"
TOKEN_ENV = "EDGE_PROXY_ADMIN_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0
PAGE = 1000  # keys per `list` call: the gateway's largest page (GET /v1/admin/keys?limit)


class AdminCallFailed(Exception):
    """The call did not succeed; the message says why (the gateway's JSON error, or the connection's)."""


def admin_token(token_file: str | None) -> str:
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise AdminCallFailed(f"cannot read --token-file {token_file}: {exc.strerror}") from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AdminCallFailed(f"no admin token: export {TOKEN_ENV} or pass --token-file")
    return token


def call(base_url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin call; the answer's JSON, or AdminCallFailed with the error the gateway gave."""
    try:
        request = urllib.request.Request(
            base_url.rstrip("/") + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise AdminCallFailed(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminCallFailed(f"cannot reach {base_url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:  # urllib's word for a URL it cannot parse (empty, no scheme, a broken IPv6 host)
        raise AdminCallFailed(f"--url {base_url!r} is not a URL like {DEFAULT_URL}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise AdminCallFailed(f"{base_url} answered {raw[:80]!r}, not JSON: is it the gateway?") from None


def _key_path(args: argparse.Namespace, action: str = "") -> str:
    return f"/v1/admin/keys/{quote(args.key_id, safe='')}{action}"


def _fields(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags that were given, as body fields; `--overrides` is JSON."""
    body = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "overrides" in body:
        try:
            body["overrides"] = json.loads(body["overrides"])
        except ValueError as exc:
            raise AdminCallFailed(f"--overrides is not JSON: {exc}") from None
    if "allow_direct" in body:
        body["allow_direct"] = body["allow_direct"] == "true"
    return body


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """Method, path and body of the verb."""
    verb = args.keys_command
    if verb == "create":
        return "POST", "/v1/admin/keys", _fields(args, ("id", "plan", "account", "allow_direct", "overrides", "reason"))
    if verb == "list":
        return "GET", f"/v1/admin/keys?limit={PAGE}", None
    if verb == "get":
        return "GET", _key_path(args), None
    if verb in ("disable", "enable", "rotate"):
        return "POST", _key_path(args, f"/{verb}"), _fields(args, ("reason",))
    if verb == "set":
        return "PATCH", _key_path(args), _fields(args, ("plan", "account", "allow_direct", "overrides", "reason"))
    body = _fields(args, ("credits", "reason", "period"))  # topup
    return "POST", f"/v1/admin/accounts/{quote(args.account, safe='')}/credits", body


def run(args: argparse.Namespace) -> int:
    """Run one verb and print the answer as JSON; errors go to stderr with exit status 1."""
    try:
        method, path, body = _request(args)
        token = admin_token(args.token_file)
        answer = call(args.url, token, method, path, body)
        if args.keys_command == "list":  # every page, printed as one list
            keys = answer["keys"]
            while answer.get("next_cursor"):
                answer = call(args.url, token, method, f"{path}&cursor={quote(answer['next_cursor'], safe='')}")
                keys += answer["keys"]
            answer = {"keys": keys}
    except AdminCallFailed as exc:
        print(f"edge-proxy keys {args.keys_command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def add_verbs(key_commands: Any) -> None:
    """Register the admin verbs under `edge-proxy keys`."""

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        command = key_commands.add_parser(name, help=help_text)
        command.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                             help=f"the gateway (default: ${URL_ENV} or {DEFAULT_URL})")
        command.add_argument("--token-file", help=f"file holding the admin token (default: ${TOKEN_ENV})")
        command.set_defaults(run=run)
        return command

    def key_fields(command: argparse.ArgumentParser) -> None:
        command.add_argument("--account", help="whom to bill (default: the key id)")
        command.add_argument("--allow-direct", dest="allow_direct", choices=("true", "false"))
        command.add_argument("--overrides", help='the plan fields to override, as JSON, e.g. \'{"concurrency": 4}\'')
        command.add_argument("--reason")

    create = verb("create", "create a stored key; prints its secret once")
    create.add_argument("--plan", required=True)
    create.add_argument("--id")
    key_fields(create)
    verb("list", "list every key (never a secret)")
    verb("get", "show one key").add_argument("key_id")
    for name, help_text in (("disable", "disable a key and its tokens"), ("enable", "enable a key again"),
                            ("rotate", "give a key a new secret (printed once); the old one stops")):
        command = verb(name, help_text)
        command.add_argument("key_id")
        command.add_argument("--reason")
    update = verb("set", "change a stored key's plan, account, allow_direct or overrides")
    update.add_argument("key_id")
    update.add_argument("--plan")
    key_fields(update)
    topup = verb("topup", "add credits to an account's budget (negative: charge)")
    topup.add_argument("account")
    topup.add_argument("credits", type=float)
    topup.add_argument("--reason", required=True)
    topup.add_argument("--period", choices=("none", "day", "month"))
