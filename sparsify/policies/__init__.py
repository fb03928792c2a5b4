"""Policies: importance vectors → zeros. Built-ins register themselves on import."""

from sparsify.policies import gradual_magnitude, slimming, soft_threshold  # noqa: F401
from sparsify.policies.base import POLICIES, Policy, PolicyConfig, list_policies, make_policy, register_policy
from sparsify.policies.gradual_magnitude import GMPConfig
from sparsify.policies.slimming import SlimmingConfig
from sparsify.policies.soft_threshold import STRConfig

__all__ = ["POLICIES", "GMPConfig", "Policy", "PolicyConfig", "STRConfig", "SlimmingConfig", "list_policies",
           "make_policy", "register_policy"]
