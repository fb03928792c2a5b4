"""Configs: validation, open registries, YAML/JSON round-trips, registry errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sparsify import BNGammaConfig, FilterNormConfig, GMPConfig, SlimmingConfig, SparsifierConfig, STRConfig
from sparsify.adapters import ADAPTERS
from sparsify.extend import list_adapters, list_policies, register_policy
from sparsify.policies import POLICIES, PolicyConfig
from sparsify.policies.soft_threshold import STRPolicy

ALL_CONFIGS = [cls for cls, _ in (*[c for _, c in ADAPTERS.items()], *[c for _, c in POLICIES.items()])]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_registered_config_round_trips(cls: type) -> None:
    config = cls()
    assert cls.model_validate(config.model_dump()) == config
    assert cls.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_description(cls: type) -> None:
    missing = [n for n, f in cls.model_fields.items() if n != "kind" and not f.description]
    assert not missing, f"{cls.__name__}: fields without description: {missing}"


def test_yaml_and_json_round_trip_keep_subclass_fields(tmp_path: Path) -> None:
    config = SparsifierConfig(adapter=FilterNormConfig(p=1),
                              policy=GMPConfig(sparsity=0.7, budget="erk", unit="macs", end_step=50))
    path = tmp_path / "recipe.yaml"
    path.write_text(config.to_yaml())
    assert SparsifierConfig.from_yaml(path) == config
    assert SparsifierConfig.from_yaml(path.read_text()) == config
    again = SparsifierConfig.model_validate(json.loads(config.model_dump_json()))
    assert again == config and again.policy.budget == "erk" and again.adapter.p == 1


def test_kind_strings_and_dicts_resolve() -> None:
    config = SparsifierConfig(adapter="bn_gamma", policy={"kind": "str", "s_init": -3})
    assert config.adapter == BNGammaConfig() and config.policy == STRConfig(s_init=-3)


def test_unknown_keys_and_bad_ranges_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SparsifierConfig(adapter="bn_gamma", policy={"kind": "str", "sinit": -3})
    with pytest.raises(ValidationError, match="less than 1"):
        GMPConfig(sparsity=1.5)
    with pytest.raises(ValidationError, match="end_step"):
        GMPConfig(start_step=10, end_step=5)
    with pytest.raises(ValidationError, match="initial_sparsity"):
        GMPConfig(sparsity=0.3, initial_sparsity=0.5)


def test_unknown_kind_names_the_registered_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown policy kind 'stt'.*'gmp'.*'str'"):
        SparsifierConfig(adapter="bn_gamma", policy="stt")
    with pytest.raises(ValidationError, match="needs a 'kind'"):
        SparsifierConfig(adapter="bn_gamma", policy={"s_init": 1})


def test_newer_schema_is_refused() -> None:
    with pytest.raises(ValidationError, match="newer"):
        SparsifierConfig(schema_version=99, adapter="bn_gamma", policy="str")


def test_registration_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy("str", STRConfig, STRPolicy)
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_policy("MyPolicy", STRConfig, STRPolicy)
    with pytest.raises(ValueError, match="must default to 'other'"):
        register_policy("other", STRConfig, STRPolicy)

    class NotAPolicy:
        pass

    class OkConfig(PolicyConfig):
        kind: str = "ok_kind"

    with pytest.raises(TypeError, match="subclass"):
        register_policy("ok_kind", OkConfig, NotAPolicy)  # type: ignore[arg-type]


def test_builtins_are_listed() -> None:
    assert {"bn_gamma", "filter_norm", "low_rank"} <= set(list_adapters())
    assert {"str", "gmp", "slimming"} <= set(list_policies())
    assert SlimmingConfig().budget == "global"
