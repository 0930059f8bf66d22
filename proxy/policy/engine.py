"""The decision: may this principal call this model, under which limits, and what may it cost. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from proxy.auth.api_keys import ApiKey, KeyIndex
from proxy.auth.principal import Principal
from proxy.catalog import Model
from proxy.policy.pricing import FREE, bounds, charge_bounds, price_table, resolve_price
from proxy.policy.schema import Defaults, KeySpec, Plan, PolicyError
from proxy.policy.scopes import split_scope_entries, token_scope
from proxy.policy.types import Decision, Price, RequestFacts, Usage

# Shared with the HTTP layer so that a hidden model is indistinguishable from a missing one.
MODEL_NOT_FOUND_MESSAGE = "model {model!r} does not exist; GET /v1/models lists the models you may use"
NO_FACTS = RequestFacts()


def _deny(plan: str, code: str, message: str) -> Decision:
    return Decision(allowed=False, plan=plan, error_code=code, error_message=message)


@dataclass(frozen=True)
class Policy:
    """One loaded, validated set of policies. Immutable: a request keeps the Policy it started with."""

    plans: Mapping[str, Plan]
    key_records: Mapping[str, ApiKey]  # by key id
    key_plans: Mapping[str, Plan]  # by key id, the key's plan with its overrides applied
    prices: Mapping[str, Price]  # as declared: exact ids and globs
    defaults: Defaults
    version: str  # short content hash of the policy files, for logs and metrics
    price_by_model: Mapping[str, Price] = field(default_factory=dict)
    keys: KeyIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", KeyIndex(self.key_records.values()))

    @classmethod
    def build(
        cls,
        *,
        plans: Iterable[Plan],
        keys: Iterable[KeySpec],
        prices: Mapping[str, Price],
        defaults: Defaults,
        catalog: Iterable[Model],
        version: str,
    ) -> Policy:
        """Resolve everything a request needs up front: plan caps, per-key plans, per-model prices."""
        resolved = {p.name: _with_default_caps(p, defaults) for p in plans}
        specs = list(keys)
        return cls(
            plans=MappingProxyType(resolved),
            key_records=MappingProxyType({s.id: _api_key(s) for s in specs}),
            key_plans=MappingProxyType({s.id: s.overrides.apply(resolved[s.plan]) for s in specs}),
            prices=MappingProxyType(dict(prices)),
            defaults=defaults,
            version=version,
            price_by_model=MappingProxyType(price_table(prices, catalog)),
        )

    def with_extra_keys(self, keys: Iterable[ApiKey]) -> Policy:
        """A copy with keys added from code (e.g. a demo key generated at start-up); same checks as files."""
        specs = [
            KeySpec(id=k.id, hash=k.hash, plan=k.plan, account=k.account, allow_direct=k.allow_direct,
                    disabled=k.disabled)
            for k in keys
        ]
        policy, problems = self.with_keys(specs)
        if problems:
            raise PolicyError([f"extra key {key_id!r}: {problem}" for key_id, problem in problems.items()])
        return policy

    def with_keys(self, specs: Iterable[KeySpec]) -> tuple[Policy, dict[str, str]]:
        """A copy with keys from outside the policy files (the demo key, admin-managed keys in the store).
        A key that cannot be added is left out; the second value says why, by key id."""
        records, key_plans = dict(self.key_records), dict(self.key_plans)
        hashes = {k.hash: k.id for k in records.values()}
        problems: dict[str, str] = {}
        for spec in specs:
            if spec.id in records:
                problems[spec.id] = "a key with this id already exists in the policy files; choose another id"
            elif spec.hash in hashes:
                problems[spec.id] = f"same hash as key {hashes[spec.hash]!r}; use a new secret"
            elif spec.plan not in self.plans:
                problems[spec.id] = f"plan {spec.plan!r} is not defined; define plans.{spec.plan}"
            elif spec.needs_plan_budget and self.plans[spec.plan].budget is None:
                problems[spec.id] = f"overrides.budget.credits: missing, and plan {spec.plan!r} has no budget"
            else:
                records[spec.id], hashes[spec.hash] = _api_key(spec), spec.id
                key_plans[spec.id] = spec.overrides.apply(self.plans[spec.plan])
        policy = replace(self, key_records=MappingProxyType(records), key_plans=MappingProxyType(key_plans))
        return policy, problems

    def key(self, key_id: str) -> ApiKey | None:
        """The key record by id (e.g. to check that a token's key still exists and is enabled)."""
        return self.key_records.get(key_id)

    def price_for(self, model: Model) -> Price | None:
        hit = self.price_by_model.get(model.id)
        return hit if hit is not None else resolve_price(self.prices, model.id)

    def decide(self, principal: Principal, model: Model, facts: RequestFacts = NO_FACTS) -> Decision:
        """Allow with the limits, budget and reservation for this call, or deny with an error code."""
        plan = self._plan(principal)
        if isinstance(plan, Decision):
            return plan
        key = self.key_records.get(principal.key_id) if principal.key_id else None
        if key is not None and principal.kind == "api_key" and not key.allow_direct:
            return _deny(
                plan.name,
                "forbidden",
                f"API key {key.id!r} may only mint tokens (allow_direct: false); call POST /v1/tokens and use the token",
            )
        if not self._in_scope(plan, principal, model):
            return self._out_of_scope(plan, principal, model)
        price = self.price_for(model)
        if price is None and plan.budget is not None:
            if self.defaults.unpriced == "deny":
                return _deny(
                    plan.name,
                    "forbidden",
                    f"model {model.id!r} has no price and plan {plan.name!r} has a credit budget; "
                    "ask the operator to add it under prices: (or set defaults.unpriced: free)",
                )
            price = FREE
        limit = bounds(facts, model, plan.max_output_tokens or 0, plan.max_seconds or 0.0)
        return Decision(
            allowed=True,
            plan=plan.name,
            rate_limits=plan.rate_limits,
            concurrency=plan.concurrency,
            budget=plan.budget,
            price=price,
            reserve_credits=charge_bounds(price, limit) if price is not None else 0.0,
            estimated_tokens=limit.tokens,
            max_output_tokens=limit.output_tokens_per_choice,
            bound=Usage(
                limit.input_tokens, limit.output_tokens, limit.images, limit.seconds, limit.characters, limit.megapixels
            ),
            allow_pricier_fallbacks=plan.allow_pricier_fallbacks,
            cancel_jobs_on_disconnect=plan.cancel_jobs_on_disconnect,
        )

    def allows(self, principal: Principal, model: Model) -> bool:
        """Is the model within the principal's scopes (plan or key overrides, narrowed by token scopes)?"""
        plan = self._plan(principal)
        return not isinstance(plan, Decision) and self._in_scope(plan, principal, model)

    def visible_models(self, principal: Principal, catalog: Iterable[Model]) -> list[Model]:
        """The catalogue as this principal may see it (GET /v1/models), in catalogue order."""
        plan = self._plan(principal)
        if isinstance(plan, Decision):
            return []
        return [m for m in catalog if self._in_scope(plan, principal, m)]

    def unmatched_scopes(self, principal: Principal, scopes: Iterable[str], catalog: Iterable[Model]) -> list[str]:
        """Requested token scopes that would grant nothing this principal may use (POST /v1/tokens rejects them)."""
        visible = self.visible_models(principal, catalog)
        return [s for s in scopes if not any(split_scope_entries([s]).allows(m) for m in visible)]

    def plan_decision(self, principal: Principal) -> Decision:
        """The plan's limits and budget with no model in view, for reading live counters (GET /v1/me)."""
        plan = self._plan(principal)
        if isinstance(plan, Decision):
            return plan
        return Decision(
            allowed=True, plan=plan.name, rate_limits=plan.rate_limits, concurrency=plan.concurrency, budget=plan.budget
        )

    def token_scopes(self, principal: Principal) -> list[str]:
        """The principal's scope as a flat list (model patterns and capabilities) that minted tokens may narrow."""
        plan = self._plan(principal)
        if isinstance(plan, Decision):
            return []
        described = plan.scope.describe()
        return [*described["models"], *described["capabilities"]]

    def plan_info(self, principal: Principal) -> dict[str, Any]:
        """The principal's plan for GET /v1/me: name, scopes, limits and budget (no live counters)."""
        plan = self._plan(principal)
        if isinstance(plan, Decision):
            return {"plan": plan.plan, "error": {"code": plan.error_code, "message": plan.error_message}}
        budget = plan.budget
        return {
            "plan": plan.name,
            "scopes": plan.scope.describe(),
            "token_scopes": list(principal.scopes) if principal.scopes is not None else None,
            "rate_limits": [
                {"name": r.name, "per": list(r.per), "unit": r.unit, "limit": r.limit, "window_s": r.window_s}
                for r in plan.rate_limits
            ],
            "concurrency": plan.concurrency,
            "budget": {"credits": budget.credits, "period": budget.period, "scope": budget.scope} if budget else None,
        }

    def _plan(self, principal: Principal) -> Plan | Decision:
        """The plan that applies, or a denial: a key's current plan (with overrides) wins over the credential's."""
        if principal.key_id is not None:
            key = self.key_records.get(principal.key_id)
            if key is None or key.disabled:
                # Revoking or disabling a key also revokes the tokens minted from it.
                code = "invalid_api_key" if principal.kind == "api_key" else "invalid_token"
                return _deny(principal.plan, code, "the API key behind this credential is disabled or no longer exists")
            return self.key_plans[key.id]
        plan = self.plans.get(principal.plan)
        if plan is None:
            return _deny(
                principal.plan,
                "forbidden",
                f"plan {principal.plan!r} is not defined in the policies; ask the operator to define plans.{principal.plan}",
            )
        return plan

    @staticmethod
    def _in_scope(plan: Plan, principal: Principal, model: Model) -> bool:
        if not plan.scope.allows(model):
            return False
        return principal.scopes is None or token_scope(tuple(principal.scopes)).allows(model)

    def _out_of_scope(self, plan: Plan, principal: Principal, model: Model) -> Decision:
        if self.defaults.hide_unauthorized_models:
            return _deny(plan.name, "model_not_found", MODEL_NOT_FOUND_MESSAGE.format(model=model.id))
        whose = f"plan {plan.name!r}" if not plan.scope.allows(model) else "this token's scopes"
        return _deny(plan.name, "provider_not_authorized", f"model {model.id!r} is not within {whose}")


def _with_default_caps(plan: Plan, defaults: Defaults) -> Plan:
    return replace(
        plan,
        max_output_tokens=plan.max_output_tokens or defaults.max_output_tokens,
        max_seconds=plan.max_seconds or defaults.max_seconds,
    )


def _api_key(spec: KeySpec) -> ApiKey:
    return ApiKey(
        id=spec.id,
        hash=spec.hash,
        plan=spec.plan,
        account=spec.account,
        allow_direct=spec.allow_direct,
        disabled=spec.disabled,
    )
