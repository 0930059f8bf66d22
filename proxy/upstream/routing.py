"""Route: which deployment serves a call, and how each upstream is doing.

A request walks its model's deployments in its selection's order, then its fallback models' deployments, each
at most once, within `routing.max_attempts` and `routing.deadline_s` (`Router.plan` -> `Attempts`). The caller
reports each attempt's outcome to the upstream's `Health` (one per provider and model id there, shared by every
catalogue entry that lists it): a circuit breaker (failures in a row, a window of calls failing at
`error_rate`, or a smoothed latency above `max_latency_s` open it; after the cooldown one probe may go; its success closes it) and a throttle rest (a 429's
Retry-After); and its smoothed latency (time to response headers) for `selection: latency`. State is local
to the replica: choosing never waits for the network.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Iterator, Literal, Mapping

from ..catalog import Deployment, Model
from ..config import RoutingSettings

BreakerState = Literal["closed", "half_open", "open"]


OnBreaker = Callable[[str, str, BreakerState], None]  # (model, deployment, new state), e.g. for metrics


def _ignore(model: str, deployment: str, state: BreakerState) -> None:
    pass


class Health:
    """One upstream's breaker, throttle cooldown and latency (a provider and its model id there, whichever
    catalogue models list it). Times are `clock()` seconds."""

    def __init__(self, settings: RoutingSettings, clock: Callable[[], float], on_breaker: OnBreaker) -> None:
        self.labels: list[tuple[str, str]] = []  # (model, deployment name) of every catalogue entry served here
        self._settings = settings.breaker
        self._smoothing = settings.latency_smoothing
        self._clock = clock
        self._on_breaker = on_breaker
        self._failures = 0  # in a row
        self._recent: deque[bool] = deque(maxlen=settings.breaker.window)  # the last calls' verdicts: True = failed
        self._recent_failures = 0
        self._open_until: float | None = None  # None: closed
        self._probing = False  # half-open: the one call allowed through is under way
        self._rest_until = 0.0  # a 429's Retry-After
        self.in_flight = 0  # calls claimed here and not ended yet (least_in_flight selection)
        self.latency_s: float | None = None  # smoothed time to response headers; None: not measured yet
        self._latency_samples = 0

    def _changed(self, state: BreakerState) -> None:
        for model, deployment in self.labels:
            self._on_breaker(model, deployment, state)

    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return "closed"
        return "half_open" if self._clock() >= self._open_until else "open"

    def available(self, now: float) -> bool:
        """May a call go here now (without taking the half-open probe)?"""
        if now < self._rest_until:
            return False
        return self._open_until is None or (now >= self._open_until and not self._probing)

    def take(self, now: float) -> bool:
        """Claim a call here: always when closed; when half-open, only the single probe. Every claim ends with
        exactly one of `succeeded`, `failed`, `throttled` or `abandoned`."""
        if not self.available(now):
            return False
        self.in_flight += 1
        if self._open_until is not None:
            self._probing = True
            self._changed("half_open")
        return True

    def ready_in(self, now: float) -> float:
        """Seconds until a call may go here again (0: now)."""
        until = max(self._rest_until, self._open_until or 0.0)
        return max(0.0, until - now)

    def _ended(self) -> bool:
        """A claimed call is over; True if it was the half-open probe."""
        probe, self._probing = self._probing, False
        self.in_flight = max(0, self.in_flight - 1)
        return probe

    def _note(self, failed: bool) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_failures -= self._recent[0]
        self._recent.append(failed)
        self._recent_failures += failed

    def _flapping(self) -> bool:
        """A full window of recent calls failed at least `error_rate` of the time."""
        rate = self._settings.error_rate
        return rate is not None and len(self._recent) == self._recent.maxlen and (
            self._recent_failures >= rate * len(self._recent)
        )

    def observed(self, seconds: float) -> None:
        """An answer's headers came `seconds` after its call went out. Past `max_latency_s` the deployment is
        ejected: its smoothed latency once it has `latency_samples` samples, or the half-open probe's own."""
        if self._open_until is not None and not self._probing:
            return  # a call from before the breaker opened: the record starts again with the probe
        previous = self.latency_s
        self.latency_s = seconds if previous is None else previous + self._smoothing * (seconds - previous)
        self._latency_samples += 1
        bound = self._settings.max_latency_s
        if bound is not None and self.latency_s > bound and (
            self._probing or self._latency_samples >= self._settings.latency_samples
        ):
            self._probing = False  # the probe's verdict is given: its end does not close the breaker
            self._open()

    def succeeded(self) -> None:
        probe = self._ended()
        self._note(False)
        self._failures = 0
        if probe:  # only the probe closes an open breaker; calls from before it opened do not
            self._open_until = None
            self._changed("closed")

    def failed(self) -> None:
        """A connect error, a timeout, a 5xx or a stream that broke off."""
        probe = self._ended()
        self._note(True)
        self._failures += 1
        if probe or self._failures >= self._settings.failures or self._flapping():
            self._open()

    def _open(self) -> None:
        self._open_until = self._clock() + self._settings.cooldown_s
        # Back from the cooldown, the deployment starts with a clean record.
        self._recent.clear()
        self._recent_failures = 0
        self.latency_s, self._latency_samples = None, 0
        self._changed("open")

    def throttled(self, seconds: float) -> None:
        """A 429: rest for `seconds`; throttling says nothing about health, so the breaker keeps its count."""
        self._ended()
        self.rest(seconds)

    def rest(self, seconds: float) -> None:
        """Take no new call for `seconds` (a 429, or an answer saying the quota is used up)."""
        self._rest_until = max(self._rest_until, self._clock() + seconds)

    def abandoned(self) -> None:
        """The call ended without a verdict (the client left, nothing was sent): a half-open probe may go again."""
        self._ended()


@dataclass(frozen=True)
class Target:
    """A candidate for one attempt: the model that would answer (the requested one or a fallback) and where."""

    model: Model
    deployment: Deployment
    health: Health

    @property
    def label(self) -> str:
        return self.deployment.name


class Attempts:
    """One request's way through its targets. `next()` claims the next one that is available now. Targets are
    drawn from `targets` only as needed: a fallback's policy check runs only once the request gets that far."""

    def __init__(self, targets: Iterator[Target], settings: RoutingSettings, clock: Callable[[], float]) -> None:
        self._pending: list[Target] = []
        self._more = targets
        self._settings = settings
        self._clock = clock
        self._started: float | None = None
        self.made = 0

    def _open(self, now: float) -> bool:
        if self.made >= self._settings.max_attempts:
            return False
        return self._started is None or now - self._started < self._settings.deadline_s

    def _remaining(self) -> list[Target]:
        self._pending.extend(self._more)
        return self._pending

    def has_next(self) -> bool:
        """Would `next()` find a target now? (Decides whether a failed answer is retried or passed on.)"""
        now = self._clock()
        return self._open(now) and any(t.health.available(now) for t in self._remaining())

    def next(self) -> Target | None:
        now = self._clock()
        if not self._open(now):
            return None
        for i, target in enumerate(self._pending):
            if target.health.take(now):
                del self._pending[i]
                return self._claimed(target, now)
        for target in self._more:
            if target.health.take(now):
                return self._claimed(target, now)
            self._pending.append(target)
        return None

    def _claimed(self, target: Target, now: float) -> Target:
        self._started = self._started if self._started is not None else now
        self.made += 1
        return target

    def ready_in(self) -> float:
        """Seconds until one of the targets not tried yet may take a call."""
        now = self._clock()
        return min((t.health.ready_in(now) for t in self._remaining()), default=0.0)


class Router:
    """Built once at start-up from the catalogue: every deployment's health, every model's fallbacks."""

    def __init__(
        self, models: Mapping[str, Model], settings: RoutingSettings, *, rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic, on_breaker: OnBreaker = _ignore,
    ) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._clock = clock
        healths: dict[tuple[str, str], Health] = {}
        self._targets: dict[str, tuple[Target, ...]] = {}
        for model in models.values():
            targets = []
            for d in model.served_by():
                health = healths.setdefault(
                    (d.provider, d.upstream_model), Health(settings, clock, on_breaker)
                )
                health.labels.append((model.id, d.name))
                targets.append(Target(model, d, health))
            self._targets[model.id] = tuple(targets)
        self._fallbacks = {m.id: tuple(self._targets[f] for f in m.fallbacks) for m in models.values()}

    def health(self, model: str, deployment: str) -> Health:
        return next(t.health for t in self._targets[model] if t.deployment.name == deployment)

    def plan(self, model: Model, permits: Callable[[Model], bool] = lambda m: True, user: str = "") -> Attempts:
        """The request's targets: the model's deployments in its selection's order (`user`: the end user, for
        sticky models), then each permitted fallback's deployments in that model's order."""
        own = self._ordered(model, self._targets[model.id], user)
        fallbacks = (
            self._ordered(targets[0].model, targets, user)
            for targets in self._fallbacks[model.id] if permits(targets[0].model)
        )
        return Attempts(_chain(own, fallbacks), self.settings, self._clock)

    def _ordered(self, model: Model, targets: tuple[Target, ...], user: str) -> Iterator[Target]:
        if len(targets) == 1:
            return iter(targets)
        if model.selection == "least_in_flight":
            return iter(sorted(targets, key=lambda t: (t.health.in_flight / t.deployment.weight, self._rng.random())))
        if model.selection == "sticky":
            return iter(sorted(targets, key=lambda t: _rendezvous(user, t.deployment), reverse=True))
        if model.selection == "latency" and self._rng.random() >= self.settings.latency_explore:
            # Fastest first; one not measured yet goes first so it gets measured. The other calls (exploring)
            # take the weighted order below, so a slow deployment that recovered is measured again.
            return iter(sorted(targets, key=lambda t: (t.health.latency_s or 0.0, self._rng.random())))
        # Weighted sampling without replacement (Efraimidis-Spirakis keys).
        keys = [self._rng.random() ** (1.0 / t.deployment.weight) for t in targets]
        return iter([t for _, t in sorted(zip(keys, targets), key=lambda pair: pair[0], reverse=True)])


def _rendezvous(user: str, deployment: Deployment) -> float:
    """Weighted rendezvous hashing: a user's highest-scoring deployment is stable, and users spread by weight."""
    digest = hashlib.blake2b(f"{user}\0{deployment.name}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -deployment.weight / math.log(unit)


def _chain(first: Iterator[Target], rest: Iterator[Iterator[Target]]) -> Iterator[Target]:
    yield from first
    for targets in rest:
        yield from targets


def retry_after_s(value: str | None, default_s: float, max_s: float) -> float:
    """A Retry-After header (seconds or an HTTP date) as seconds from now, within [0, max_s]; else the default."""
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = default_s
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), max_s)
    return min(default_s, max_s)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


def reset_after_s(value: str | None) -> float | None:
    """A provider's quota reset (`x-ratelimit-reset-requests`): plain seconds or a duration such as `6m0s`,
    `1.5s`, `20ms`; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.fullmatch(value.strip())
        if match is None or not any(match.groups()):
            return None
        hours, minutes, secs, millis = (float(part or 0) for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs + millis / 1000
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
