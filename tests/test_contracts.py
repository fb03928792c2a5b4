"""Contract tests over the registries (sparsify.testing.contracts): every registered op rule and every
adapter × policy pair, read from the registries when the tests are collected, against the exactness
oracle. A new plugin is tested by being registered; a new op rule must bring a model."""

from __future__ import annotations

import pytest
import torch

from sparsify.adapters.base import ADAPTERS
from sparsify.extend import list_adapters, list_op_rules, list_policies
from sparsify.graph.op_rules import OP_RULES
from sparsify.policies.base import POLICIES
from sparsify.testing import contracts
from sparsify.testing.contracts import check_op_rule, check_pair, missing_rule_models, rules_used

pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # torch.export on nn.LSTM

OUTCOMES: dict[tuple[str, str], str] = {}  # (adapter, policy) → outcome, for the summary test


def builtin_op_rules() -> list[str]:
    """The op rules the package registers itself (tests register their own, checked where they are defined)."""
    return [k for k in list_op_rules() if OP_RULES.get(k).fn.__module__.startswith("sparsify.")]


def _builtin(registry: object) -> list[str]:
    """Kinds of a plugin registry whose implementation the package ships (tests register their own)."""
    return [kind for kind, (_, impl) in registry.items() if impl.__module__.startswith("sparsify.")]


BUILTIN_ADAPTERS, BUILTIN_POLICIES = _builtin(ADAPTERS), _builtin(POLICIES)


def test_every_registered_op_rule_has_a_contract_model() -> None:
    assert missing_rule_models(builtin_op_rules()) == [], "add a model for each to contracts.RULE_MODELS"


def test_a_rule_without_a_model_is_reported() -> None:
    """The check above can fail: an unknown kind (not registered, so nothing leaks) is reported."""
    assert missing_rule_models(["conv", "contract_test_unmodelled_rule"]) == ["contract_test_unmodelled_rule"]
    with pytest.raises(AssertionError, match="has no contract model"):
        check_op_rule("contract_test_unmodelled_rule")


@pytest.mark.parametrize("kind", builtin_op_rules())
def test_op_rule_is_exact_on_its_model(kind: str) -> None:
    result = check_op_rule(kind)
    assert result.groups_pruned >= 1 and result.max_abs_diff <= contracts.TOLERANCE * (1 + result.output_scale)


def test_rule_model_must_use_its_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table entry whose model does not use the rule fails (here: conv paired with an MLP)."""
    model, inputs = contracts.RULE_MODELS["linear"](torch.float64)
    assert "conv" not in rules_used(model, inputs)
    monkeypatch.setitem(contracts.RULE_MODELS, "conv", contracts.RULE_MODELS["linear"])
    with pytest.raises(AssertionError, match="does not use op rule 'conv'"):
        check_op_rule("conv")


@pytest.mark.parametrize("policy", BUILTIN_POLICIES)
@pytest.mark.parametrize("adapter", BUILTIN_ADAPTERS)
def test_adapter_policy_pair_prunes_exactly_or_is_refused(adapter: str, policy: str,
                                                         record_property: pytest.RecordProperty) -> None:
    result = check_pair(adapter, policy)
    OUTCOMES[(adapter, policy)] = result.outcome
    record_property("outcome", f"{result.outcome} on {result.model} {result.error}".strip())
    if result.outcome == "exact":
        assert result.zeros > 0 and result.max_abs_diff <= contracts.TOLERANCE
    else:
        assert result.outcome == "refused" and result.error


# Built-in pairs whose outcome is known: a change either way is a behaviour change to look at.
KNOWN_REFUSED = {("filter_norm", "slimming"), ("activation", "slimming"), ("heads", "slimming"),
                 ("low_rank", "slimming"), ("rnn_units", "slimming"),
                 ("torch_pruning", "str"), ("torch_pruning", "slimming"),  # computed scores: mask policies only
                 ("taylor", "str"), ("taylor", "slimming"), ("fluctuation", "slimming")}
BUILTIN_PAIRS = sorted((a, p) for a in contracts.ADAPTER_CASES if a in list_adapters()
                       for p in contracts.POLICY_CASES if p in list_policies())


@pytest.mark.parametrize("pair", BUILTIN_PAIRS, ids=[f"{a}-{p}" for a, p in BUILTIN_PAIRS])
def test_builtin_pair_outcome_is_the_known_one(pair: tuple[str, str]) -> None:
    outcome = OUTCOMES.get(pair) or check_pair(*pair).outcome
    assert outcome == ("refused" if pair in KNOWN_REFUSED else "exact"), pair


def test_unknown_adapter_and_policy_kinds_get_default_cases() -> None:
    """A plugin without a table entry is still tested: on every contract model, with default settings."""
    assert contracts.adapter_case("contract_test_adapter").models == contracts.ALL_MODELS
    assert contracts.policy_case("contract_test_policy").config == {}


def test_a_refusal_must_name_the_adapter_or_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A construction error that names neither plugin is a contract breach, not a refusal."""
    import sparsify.testing.contracts as module

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("something went wrong")

    monkeypatch.setattr(module, "Sparsifier", refuse)
    with pytest.raises(AssertionError, match="names neither"):
        check_pair("filter_norm", "gmp")
