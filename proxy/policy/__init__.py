"""Authorize: may this principal use this model, under which limits, at what price."""

from proxy.policy.engine import MODEL_NOT_FOUND_MESSAGE, Policy
from proxy.policy.loader import load_policy
from proxy.policy.reload import PolicyHolder
from proxy.policy.schema import Defaults, Plan, PolicyError

__all__ = ["MODEL_NOT_FOUND_MESSAGE", "Defaults", "Plan", "Policy", "PolicyError", "PolicyHolder", "load_policy"]
