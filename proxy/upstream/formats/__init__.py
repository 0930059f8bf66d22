"""Provider wire formats, one module each behind `base.WireFormat`, chosen by a provider's `kind` in config.yaml.
Each module is itself the adapter: it defines the protocol's constants and functions at its top level, so the
relay's calls are plain function calls.

Adding a format: a module implementing `WireFormat`, its entry in `ADAPTERS`, its config and its tests.
"""

from __future__ import annotations

from . import anthropic, azure_openai, bedrock, elevenlabs, gemini, openai
from .base import PreparedBody, WireFormat

# kind -> its wire format. `http` is the former name of `openai`, accepted for existing configs.
# `demo` is the built-in demo upstream (started in-process), which speaks OpenAI's format.
ADAPTERS: dict[str, WireFormat] = {
    "openai": openai,
    "http": openai,
    "demo": openai,
    "anthropic": anthropic,
    "azure_openai": azure_openai,
    "bedrock": bedrock,
    "gemini": gemini,
    "elevenlabs": elevenlabs,
}
# route -> the other dialects whose models it serves by translating bodies and answers.
TRANSLATED: dict[str, tuple[str, ...]] = {bedrock.CHAT_ROUTE: ("bedrock", "anthropic", "gemini")}
_ALIASES = {"http": "openai"}


def adapter(kind: str) -> WireFormat:
    """The wire format of a validated provider kind."""
    return ADAPTERS[kind]


def canonical_kind(kind: str) -> str:
    """A kind's own name (`http` -> `openai`): what metrics and `/v1/me` label providers by."""
    return _ALIASES.get(kind, kind)


__all__ = ["ADAPTERS", "TRANSLATED", "PreparedBody", "WireFormat", "adapter", "canonical_kind"]
