"""Model scopes: which models a plan, key or token may call, by id, glob over ids, or capability."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from proxy.catalog import CAPABILITIES, Model

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """True if the pattern has fnmatch wildcards (`*`, `?`, `[...]`), False for a plain model id."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def matches(pattern: str, model_id: str) -> bool:
    """Case-sensitive fnmatch; `*` also matches `/`, so `openai/*` covers every OpenAI model."""
    return fnmatch.fnmatchcase(model_id, pattern)


@dataclass(frozen=True)
class ModelScope:
    """A set of models: exact ids, globs over ids, and whole capabilities (a model in any part is in)."""

    patterns: tuple[str, ...] = ()
    capabilities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Compiled once: a lookup is one set access plus at most one regex match.
        ids = frozenset(p for p in self.patterns if not is_glob(p))
        globs = [fnmatch.translate(p) for p in self.patterns if is_glob(p)]
        object.__setattr__(self, "_ids", ids)
        object.__setattr__(self, "_globs", re.compile("|".join(globs)) if globs else None)

    def allows(self, model: Model) -> bool:
        if model.id in self._ids or model.capability in self.capabilities:  # type: ignore[attr-defined]
            return True
        globs: re.Pattern[str] | None = self._globs  # type: ignore[attr-defined]
        return globs is not None and globs.match(model.id) is not None

    def describe(self) -> dict[str, list[str]]:
        return {"models": list(self.patterns), "capabilities": sorted(self.capabilities)}


def split_scope_entries(entries: Iterable[str]) -> ModelScope:
    """A scope from a flat list such as a token's `scopes`: capability names or model ids/globs."""
    items = tuple(entries)
    return ModelScope(
        patterns=tuple(e for e in items if e not in CAPABILITIES),
        capabilities=frozenset(e for e in items if e in CAPABILITIES),
    )


@lru_cache(maxsize=4096)
def token_scope(scopes: tuple[str, ...]) -> ModelScope:
    """Cached: tokens of one kind repeat the same scopes, so each distinct tuple is compiled once."""
    return split_scope_entries(scopes)
