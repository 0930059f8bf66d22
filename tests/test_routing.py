"""The router on its own: config of deployments, weighted order, attempt budget, breaker and throttle states."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from proxy.config import BreakerSettings, ConfigError, RoutingSettings, parse_config
from proxy.upstream.routing import Router, reset_after_s, retry_after_s

PROVIDERS = {"a": {"kind": "demo"}, "b": {"kind": "demo"}, "c": {"kind": "demo"}}


def model(model_id: str = "m/x", **serving: Any) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "creator": "t", "capability": "text2text", **serving}


def config(*models: dict[str, Any], **routing: Any) -> Any:
    return parse_config({"providers": PROVIDERS, "models": list(models), "routing": routing}, "cfg.yaml")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def router(
    cfg: Any, seed: int = 7, clock: Clock | None = None, events: list[tuple[str, str, str]] | None = None
) -> Router:
    models = {m.id: m for m in cfg.catalog()}
    return Router(
        models, cfg.routing, rng=random.Random(seed), clock=clock or Clock(),
        on_breaker=lambda m, d, s: events.append((m, d, s)) if events is not None else None,
    )


# -- config ------------------------------------------------------------------------------------------------

def test_single_provider_form_is_one_implicit_deployment() -> None:
    (m,) = config(model(provider="a", upstream_model="up")).catalog()
    assert [(d.name, d.provider, d.upstream_model, d.weight) for d in m.served_by()] == [("a", "a", "up", 1.0)]
    assert (m.provider, m.upstream_model) == ("a", "up")


def test_deployments_form_keeps_order_weights_and_tags() -> None:
    (m,) = config(model(deployments=[
        {"provider": "a", "upstream_model": "up-a", "weight": 3},
        {"provider": "a", "upstream_model": "up-a2", "tag": "a-eu"},
    ])).catalog()
    assert [(d.name, d.upstream_model, d.weight) for d in m.deployments] == [("a", "up-a", 3.0), ("a-eu", "up-a2", 1.0)]
    assert (m.provider, m.upstream_model) == ("a", "up-a")  # the first deployment stands for the model


@pytest.mark.parametrize(("models", "expected"), [
    ([model(provider="a", upstream_model="x", deployments=[{"provider": "a", "upstream_model": "x"}])],
     "models.0: give either provider and upstream_model, or a deployments list"),
    ([model(provider="a")], "models.0: needs provider and upstream_model, or a deployments list"),
    ([model(deployments=[{"provider": "a", "upstream_model": "x"}, {"provider": "nope", "upstream_model": "y"}])],
     "models[0].deployments[1] (m/x) names provider 'nope'"),
    ([model(deployments=[{"provider": "a", "upstream_model": "x"}, {"provider": "a", "upstream_model": "y"}])],
     "deployments[1] is named 'a' like an earlier one; give each deployment at the same provider a distinct tag"),
    ([model(deployments=[{"provider": "a", "upstream_model": "x", "weight": 0}])], "models.0.deployments.0.weight"),
    ([model(provider="a", upstream_model="x", fallbacks=["m/none"])],
     "models[0].fallbacks[0] (m/x): 'm/none' is not another model"),
    ([model(provider="a", upstream_model="x", fallbacks=["m/x"])], "'m/x' is not another model"),
    ([model(provider="a", upstream_model="x", fallbacks=["m/img"]),
      {**model("m/img", provider="b", upstream_model="i"), "capability": "text2image"}],
     "'m/img' is text2image, not text2text; a fallback must answer the same kind of call"),
])
def test_bad_routing_config_names_file_key_and_fix(models: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(*models)
    assert "cfg.yaml" in str(caught.value) and expected in str(caught.value)


def test_routing_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="routing.max_attempts"):
        config(model(provider="a", upstream_model="x"), max_attempts=0)


# -- selection ---------------------------------------------------------------------------------------------

def test_weighted_selection_spreads_first_choices_as_configured() -> None:
    cfg = config(model(deployments=[
        {"provider": "a", "upstream_model": "x", "weight": 6},
        {"provider": "b", "upstream_model": "x", "weight": 3},
        {"provider": "c", "upstream_model": "x", "weight": 1},
    ]))
    r = router(cfg, seed=20261126)
    m = cfg.catalog()[0]
    firsts = Counter()
    for _ in range(10_000):
        target = r.plan(m).next()
        assert target is not None
        firsts[target.label] += 1
    # Expected 6000/3000/1000; a binomial's 4 standard deviations is under 200 at n = 10 000.
    assert abs(firsts["a"] - 6000) < 200 and abs(firsts["b"] - 3000) < 200 and abs(firsts["c"] - 1000) < 130


def test_a_request_tries_each_deployment_once_then_fallbacks_within_max_attempts() -> None:
    cfg = config(
        model(deployments=[{"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "x"}],
              fallbacks=["m/y"]),
        model("m/y", provider="c", upstream_model="y"),
        max_attempts=3,
    )
    r = router(cfg)
    attempts = r.plan(cfg.catalog()[0])
    seen = [attempts.next() for _ in range(4)]
    assert {t.label for t in seen[:2] if t} == {"a", "b"}
    assert seen[2] is not None and (seen[2].model.id, seen[2].label) == ("m/y", "c")
    assert seen[3] is None and attempts.made == 3
    denied = r.plan(cfg.catalog()[0], permits=lambda fallback: False)
    assert [denied.next() is not None for _ in range(3)] == [True, True, False]


def test_no_attempt_starts_after_the_deadline() -> None:
    clock = Clock()
    both = [{"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "x"}]
    cfg = config(model(deployments=both), deadline_s=5)
    attempts = router(cfg, clock=clock).plan(cfg.catalog()[0])
    assert attempts.next() is not None
    clock.now += 5
    assert not attempts.has_next() and attempts.next() is None


# -- health ------------------------------------------------------------------------------------------------

def test_breaker_opens_after_consecutive_failures_half_opens_with_one_probe_and_closes() -> None:
    clock, events = Clock(), []
    cfg = config(model(provider="a", upstream_model="x"), breaker={"failures": 3, "cooldown_s": 10})
    r = router(cfg, clock=clock, events=events)
    m, health = cfg.catalog()[0], r.health("m/x", "a")

    for _ in range(2):
        health.failed()
    health.succeeded()  # a success in between: the count starts again
    for _ in range(3):
        assert r.plan(m).next() is not None
        health.failed()
    assert health.state == "open" and r.plan(m).next() is None and events == [("m/x", "a", "open")]
    assert r.plan(m).ready_in() == 10

    clock.now += 10
    assert health.state == "half_open"
    probe = r.plan(m).next()
    assert probe is not None and r.plan(m).next() is None  # one probe at a time
    health.failed()  # the probe failed: open for another cooldown
    assert health.state == "open" and r.plan(m).next() is None

    clock.now += 10
    assert r.plan(m).next() is not None
    health.abandoned()  # the probe's client left: no verdict, another probe may go
    assert r.plan(m).next() is not None
    health.succeeded()
    assert health.state == "closed" and r.plan(m).next() is not None and r.plan(m).next() is not None
    assert [s for _, _, s in events] == ["open", "half_open", "open", "half_open", "half_open", "closed"]


def test_a_throttled_deployment_rests_without_counting_as_a_failure() -> None:
    clock = Clock()
    cfg = config(model(provider="a", upstream_model="x"), breaker={"failures": 1})
    r = router(cfg, clock=clock)
    health = r.health("m/x", "a")
    health.throttled(2.5)
    assert health.state == "closed" and r.plan(cfg.catalog()[0]).next() is None
    assert r.plan(cfg.catalog()[0]).ready_in() == 2.5
    clock.now += 2.5
    assert r.plan(cfg.catalog()[0]).next() is not None


@pytest.mark.parametrize(("header", "expected"), [
    ("7", 7.0), ("0", 0.0), ("-3", 0.0), ("100000", 300.0), (None, 5.0), ("soon", 5.0), ("nan", 5.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: no rest
])
def test_retry_after_is_read_as_seconds_or_a_date_and_capped(header: str | None, expected: float) -> None:
    assert retry_after_s(header, 5.0, 300.0) == expected


def test_shipped_defaults_retry_a_deployment_that_stalls_before_its_headers() -> None:
    """The deadline bounds when a further attempt may start: a first attempt that waited its whole first_byte_s
    must still leave room for a second."""
    from proxy.config import Timeouts

    assert RoutingSettings().deadline_s > Timeouts().first_byte_s + Timeouts().connect_s
    assert RoutingSettings().max_attempts == 3 and BreakerSettings().failures == 5


def test_a_fallback_is_looked_at_only_once_the_request_gets_that_far() -> None:
    cfg = config(
        model(provider="a", upstream_model="x", fallbacks=["m/y"]), model("m/y", provider="b", upstream_model="y")
    )
    asked: list[str] = []
    attempts = router(cfg).plan(cfg.catalog()[0], permits=lambda fallback: asked.append(fallback.id) is None)
    assert attempts.next() is not None and asked == []
    assert attempts.has_next() and asked == ["m/y"]
    target = attempts.next()
    assert target is not None and target.model.id == "m/y" and asked == ["m/y"]


def three_ways(selection: str, weights: tuple[float, float, float] = (1, 1, 1)) -> Any:
    return config(model(selection=selection, deployments=[
        {"provider": name, "upstream_model": "x", "weight": weight} for name, weight in zip("abc", weights)
    ]))


def test_least_in_flight_picks_the_deployment_with_the_fewest_calls_under_way() -> None:
    cfg = three_ways("least_in_flight", (2, 1, 1))
    r, m = router(cfg), cfg.catalog()[0]
    busy = [r.plan(m).next() for _ in range(4)]
    # a (weight 2) takes two calls for each one of b and c: in flight 2/2, 1/1, 1/1 after four claims.
    assert Counter(t.label for t in busy if t) == {"a": 2, "b": 1, "c": 1}
    for target in busy[:3]:
        assert target is not None
        target.health.succeeded()
    still_busy, picked = busy[3], r.plan(m).next()
    assert still_busy is not None and picked is not None and picked.label != still_busy.label
    assert sum(r.health("m/x", name).in_flight for name in "abc") == 2


def test_sticky_keeps_a_user_on_one_deployment_spreads_users_by_weight_and_moves_only_while_it_rests() -> None:
    cfg, clock = three_ways("sticky", (2, 1, 1)), Clock()
    r, m = router(cfg, clock=clock), cfg.catalog()[0]

    def first(user: str) -> str:
        target = r.plan(m, user=user).next()
        assert target is not None
        target.health.succeeded()
        return target.label

    assert len({first("alice") for _ in range(20)}) == 1
    spread = Counter(first(f"user-{i}") for i in range(4000))
    assert abs(spread["a"] - 2000) < 150 and abs(spread["b"] - 1000) < 120 and abs(spread["c"] - 1000) < 120
    home = first("alice")
    r.health("m/x", home).throttled(60)
    assert first("alice") != home
    clock.now += 60  # the rest is over
    assert first("alice") == home


def test_selection_is_validated() -> None:
    with pytest.raises(ConfigError, match="models.0.selection"):
        three_ways("round_robin")


def test_sticky_follows_the_end_user_not_the_account() -> None:
    from proxy.api.routed import _end_user
    from proxy.auth.principal import Principal

    def user(**who: Any) -> str:
        return _end_user(Principal(kind=who.pop("kind", "issuer"), account="acct", plan="p", **who))

    assert user(issuer="clerk", subject="u1") == user(issuer="clerk", subject="u1")
    assert len({user(issuer="clerk", subject="u1"), user(issuer="clerk", subject="u2"),
                user(issuer="okta", subject="u1"), user(kind="api_key", key_id="k1"), user(kind="api_key", key_id="k2"),
                user(kind="api_key")}) == 6


def test_a_flapping_deployment_is_ejected_by_its_error_rate() -> None:
    cfg = config(model(provider="a", upstream_model="x"), breaker={"failures": 5, "error_rate": 0.5, "window": 10})
    health = router(cfg).health("m/x", "a")
    for _ in range(4):  # fail, succeed, fail, ...: never five in a row, but half of every call
        health.failed()
        health.succeeded()
    health.failed()
    assert health.state == "closed"  # nine calls: the window is not full yet
    health.succeeded()
    health.failed()  # ten calls in the window (the oldest dropped), five of them failed
    assert health.state == "open"


def test_error_rate_can_be_turned_off() -> None:
    cfg = config(model(provider="a", upstream_model="x"), breaker={"error_rate": None, "window": 2})
    health = router(cfg).health("m/x", "a")
    for _ in range(50):
        health.failed()
        health.succeeded()
    assert health.state == "closed"


@pytest.mark.parametrize(("header", "expected"), [
    ("1s", 1.0), ("6m0s", 360.0), ("2m59.5s", 179.5), ("20ms", 0.02), ("1h", 3600.0), ("12", 12.0),
    (None, None), ("", None), ("soon", None), ("-1", None), ("inf", None),
])
def test_quota_reset_durations(header: str | None, expected: float | None) -> None:
    assert reset_after_s(header) == (pytest.approx(expected) if expected is not None else None)


def test_latency_selection_prefers_the_faster_deployment_and_measures_a_recovered_one_again() -> None:
    cfg = config(model(selection="latency", deployments=[
        {"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "x"},
    ]))
    r, m = router(cfg, seed=20261126), cfg.catalog()[0]
    latency = {"a": 0.1, "b": 1.0}

    def serve(calls: int) -> Counter[str]:
        firsts: Counter[str] = Counter()
        for _ in range(calls):
            target = r.plan(m).next()
            assert target is not None
            target.health.observed(latency[target.label])
            target.health.succeeded()
            firsts[target.label] += 1
        return firsts

    # Exploring (latency_explore 0.1 by default) sends b half of one call in ten: about 50 of 1000.
    assert serve(1000)["a"] > 900
    latency["b"] = 0.02  # b recovered and is now the faster one: exploring measures it again
    serve(300)
    assert serve(1000)["b"] > 900


def test_latency_selection_tries_an_unmeasured_deployment_first() -> None:
    cfg = config(model(selection="latency", deployments=[
        {"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "x"},
    ]), latency_explore=0)
    r, m = router(cfg), cfg.catalog()[0]
    r.health("m/x", "a").observed(0.5)
    target = r.plan(m).next()
    assert target is not None and target.label == "b"


def test_a_slow_deployment_is_ejected_by_its_smoothed_latency_and_probed_like_a_failing_one() -> None:
    clock, events = Clock(), []
    cfg = config(model(provider="a", upstream_model="x"),
                 breaker={"max_latency_s": 1.0, "latency_samples": 3, "cooldown_s": 10})
    r = router(cfg, clock=clock, events=events)
    m, health = cfg.catalog()[0], r.health("m/x", "a")

    def call(seconds: float) -> None:
        target = r.plan(m).next()
        assert target is not None
        target.health.observed(seconds)
        target.health.succeeded()

    call(3.0)
    call(3.0)
    assert health.state == "closed"  # two samples: not enough to judge
    before = r.plan(m).next()  # a call under way when the breaker opens
    call(3.0)
    assert health.state == "open" and events == [("m/x", "a", "open")] and r.plan(m).next() is None
    assert before is not None
    before.health.observed(0.1)
    before.health.succeeded()  # its success does not close the breaker: only the probe's does
    assert health.state == "open"

    clock.now += 10
    call(2.0)  # the probe is judged by its own latency: still too slow, open again
    assert health.state == "open"
    clock.now += 10
    call(0.2)
    assert health.state == "closed" and health.latency_s == 0.2  # a fresh record from the probe on
    assert [s for _, _, s in events] == ["open", "half_open", "open", "half_open", "closed"]


def test_latency_ejection_is_off_by_default() -> None:
    cfg = config(model(provider="a", upstream_model="x"))
    r, m = router(cfg), cfg.catalog()[0]
    for _ in range(100):
        target = r.plan(m).next()
        assert target is not None
        target.health.observed(120.0)
        target.health.succeeded()
    assert r.health("m/x", "a").state == "closed" and BreakerSettings().max_latency_s is None
