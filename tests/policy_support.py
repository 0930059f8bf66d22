"""Shared pieces for the policy tests: a small catalogue and a way to load policy text from a temp dir."""

from __future__ import annotations

import textwrap
from pathlib import Path

from proxy.auth.api_keys import hash_key
from proxy.catalog import Model
from proxy.policy import Policy, load_policy

CATALOG = (
    Model("openai/gpt-mini", "GPT mini", "OpenAI", "text2text", "openai", "gpt-mini", max_output_tokens=1000),
    Model("openai/gpt-big", "GPT big", "OpenAI", "text2text", "openai", "gpt-big"),
    Model("bfl/flux-2", "FLUX.2", "BFL", "text2image", "bfl", "flux-2"),
    Model("eleven/tts", "TTS", "Eleven", "text2speech", "eleven", "tts"),
    Model("misc/thing", "Thing", "Misc", "text2text", "misc", "thing"),
)
MODELS = {m.id: m for m in CATALOG}
SECRETS = {name: f"sk_test_{name}" for name in ("backend", "narrow", "mintonly", "paused")}
HASHES = {name: hash_key(secret) for name, secret in SECRETS.items()}


def write_policies(directory: Path, files: dict[str, str]) -> Path:
    """Write policy files (dedented) into `directory`, which is created; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def load_text(tmp_path: Path, text: str, **kwargs) -> Policy:
    """Load one policy file's text through the real loader."""
    return load_policy(write_policies(tmp_path / "policies", {"main.yaml": text}), CATALOG, **kwargs)
