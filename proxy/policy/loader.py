"""Load `policies/*.yaml` into one immutable Policy, checked against the model catalogue."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from proxy.auth.api_keys import ApiKey
from proxy.catalog import Model
from proxy.policy.engine import Policy
from proxy.policy.schema import (
    DEFAULT_FIELDS,
    Defaults,
    Invalid,
    KeySpec,
    PolicyError,
    child,
    each,
    mapping,
    parse_default,
    parse_key,
    parse_plan,
    parse_price,
)
from proxy.policy.scopes import ModelScope, matches

TOP_LEVEL = ("plans", "prices", "keys", "defaults")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class _Entry:
    """A parsed item with where it came from, for duplicate and cross-check errors."""

    value: Any
    source: str
    path: str


@dataclass
class _Merged:
    """Everything read so far, across files, by plan name, price pattern, key id and defaults field."""

    plans: dict[str, _Entry] = field(default_factory=dict)
    prices: dict[str, _Entry] = field(default_factory=dict)
    keys: dict[str, _Entry] = field(default_factory=dict)
    defaults: dict[str, _Entry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def load_policy(
    directory: str | Path,
    catalog: Iterable[Model],
    *,
    issuer_plans: Iterable[str] = (),
    extra_keys: Iterable[ApiKey] = (),
) -> Policy:
    """Read, validate and merge every `*.yaml` in `directory`; raise PolicyError listing every problem."""
    directory = Path(directory)
    models = tuple(catalog)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise PolicyError([f"{directory.name}/: no *.yaml policy files; add one (see docs/policies.md)"])
    merged = _Merged()
    version = hashlib.sha256()
    for path in files:
        text = path.read_bytes()
        version.update(path.name.encode() + b"\0" + text + b"\0")
        source = f"{directory.name}/{path.name}"  # relative, so messages never show this machine's paths
        _merge_file(_read(text, source, merged.problems), source, merged)
    if not merged.plans and not merged.problems:
        # Also catches a file caught mid-write (truncated) by the watcher: never swap in "deny everything".
        merged.problems.append(f"{directory.name}/: no plans defined in any policy file; add a plans: section")
    _check_against_catalog(merged, models)
    _check_issuer_plans(merged, issuer_plans)
    if merged.problems:
        raise PolicyError(merged.problems)
    policy = Policy.build(
        plans=[e.value for e in merged.plans.values()],
        keys=[e.value for e in merged.keys.values()],
        prices={pattern: e.value for pattern, e in merged.prices.items()},
        defaults=Defaults(**{k: e.value for k, e in merged.defaults.items()}),
        catalog=models,
        version=version.hexdigest()[:12],
    )
    return policy.with_extra_keys(extra_keys)


def _read(text: bytes, source: str, problems: list[str]) -> dict[str, Any]:
    """One file's top-level mapping, or {} after recording why it could not be read."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
        return mapping(doc, "", TOP_LEVEL)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problems.append(f"{source}: {where}invalid YAML ({getattr(exc, 'problem', None) or exc}); fix the syntax")
    except Invalid as exc:
        problems.append(exc.located(source))
    return {}


def _entries(doc: dict[str, Any], section: str, kind: type, source: str, problems: list[str]) -> Any:
    """A top-level section if it has the right shape (mapping or list), else empty after a problem."""
    value = doc.get(section)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        shape = "a mapping" if kind is dict else "a list"
        problems.append(f"{source}: {section}: expected {shape}, got {type(value).__name__}; see docs/policies.md")
        return kind()
    return value


def _merge_file(doc: dict[str, Any], source: str, merged: _Merged) -> None:
    """Parse one file's sections into `merged`; an id already defined by another file is an error."""
    problems = merged.problems
    plans = _entries(doc, "plans", dict, source, problems)
    for plan in each(((child("plans", n), (n, raw)) for n, raw in plans.items()), parse_plan, problems, source):
        _add_unique(merged.plans, plan.name, plan, source, child("plans", plan.name), problems)
    prices = _entries(doc, "prices", dict, source, problems)
    for pattern, raw in prices.items():
        for price in each([(child("prices", pattern), raw)], parse_price, problems, source):
            _add_unique(merged.prices, str(pattern), price, source, child("prices", pattern), problems)
    keys = _entries(doc, "keys", list, source, problems)
    for i, raw in enumerate(keys):
        for key in each([(child("keys", i), raw)], parse_key, problems, source):
            _add_unique(merged.keys, key.id, key, source, child(child("keys", i), "id"), problems)
    defaults = _entries(doc, "defaults", dict, source, problems)
    for key, value in defaults.items():
        path = child("defaults", key)
        try:
            mapping({key: value}, "defaults", DEFAULT_FIELDS)
            _add_unique(merged.defaults, key, parse_default(path, key, value), source, path, problems)
        except Invalid as exc:
            problems.append(exc.located(source))


def _add_unique(into: dict[str, _Entry], key: str, value: Any, source: str, path: str, problems: list[str]) -> None:
    if key in into:
        first = into[key].source
        problems.append(f"{source}: {path}: {key!r} is already defined in {first}; rename one or keep only one")
        return
    into[key] = _Entry(value, source, path)


def _matches_any(pattern: str, models: tuple[Model, ...]) -> bool:
    return any(matches(pattern, m.id) for m in models)


def unmatched_patterns(scope: ModelScope, models: tuple[Model, ...]) -> list[tuple[int, str]]:
    """The scope's model patterns (with their index) that match no model of the catalogue."""
    return [(i, pattern) for i, pattern in enumerate(scope.patterns) if not _matches_any(pattern, models)]


def _check_scope(scope: ModelScope, path: str, source: str, models: tuple[Model, ...], problems: list[str]) -> None:
    for i, pattern in unmatched_patterns(scope, models):
        problems.append(
            f"{source}: {child(child(path, 'models'), i)}: {pattern!r} matches no model in the catalogue; "
            "fix the id or glob, or add the model to config.yaml models"
        )


def _check_against_catalog(merged: _Merged, models: tuple[Model, ...]) -> None:
    """Every glob and id must mean something, every key must name a defined plan, no hash twice."""
    problems = merged.problems
    for entry in merged.plans.values():
        _check_scope(entry.value.scope, entry.path, entry.source, models, problems)
    for pattern, entry in merged.prices.items():
        if not _matches_any(pattern, models):
            problems.append(
                f"{entry.source}: {entry.path}: prices a model that is not in the catalogue; "
                "fix the id or glob, or add the model to config.yaml models"
            )
    hashes: dict[str, str] = {}
    for entry in merged.keys.values():
        key, source, path = entry.value, entry.source, entry.path.removesuffix(".id")
        if key.plan not in merged.plans:
            problems.append(
                f"{source}: {path}.plan: plan {key.plan!r} is not defined; "
                f"define plans.{key.plan} or use one of: {', '.join(sorted(merged.plans)) or '(none defined)'}"
            )
        elif key.needs_plan_budget and merged.plans[key.plan].value.budget is None:
            problems.append(
                f"{source}: {path}.overrides.budget.credits: missing, and plan {key.plan!r} has no budget to "
                "inherit it from; add credits:"
            )
        if key.overrides.scope is not None:
            _check_scope(key.overrides.scope, f"{path}.overrides", source, models, problems)
        if key.hash in hashes:
            problems.append(f"{source}: {path}.hash: same hash as key {hashes[key.hash]!r}; give each key its own secret")
        hashes.setdefault(key.hash, key.id)


def _check_issuer_plans(merged: _Merged, issuer_plans: Iterable[str]) -> None:
    for plan in sorted(set(issuer_plans)):
        if plan not in merged.plans:
            merged.problems.append(
                f"config.yaml: issuers: plan {plan!r} is not defined in any policy file; "
                f"add plans.{plan} to a policies/*.yaml or change the issuer's plan"
            )
