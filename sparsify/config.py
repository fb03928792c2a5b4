"""``SparsifierConfig``: adapter + policy configs, open to user-registered kinds, YAML/JSON round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from sparsify._validation import refuse_bool_numbers
from sparsify.adapters import ADAPTERS, AdapterConfig
from sparsify.errors import SparsifyError
from sparsify.policies import POLICIES, PolicyConfig

SCHEMA_VERSION = 1


def _resolve(value: Any, registry: Any, base: type[BaseModel], what: str) -> Any:
    if isinstance(value, base):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if isinstance(value, dict):
        if "kind" not in value:
            raise ValueError(f"{what} config needs a 'kind' (one of {registry.list()})")
        try:
            config_cls = registry.config_class(value["kind"])
        except KeyError as exc:
            raise ValueError(str(exc).strip('"')) from None
        return config_cls.model_validate(value)
    raise ValueError(f"{what} must be a kind string, a dict with 'kind', or a config object")


class SparsifierConfig(BaseModel):
    """Everything a Sparsifier needs besides the model: which adapter and which policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    schema_version: int = Field(SCHEMA_VERSION, description="config format version")
    adapter: SerializeAsAny[AdapterConfig] = Field(description="structures → importance vectors")
    policy: SerializeAsAny[PolicyConfig] = Field(description="importance vectors → zeros")
    verify_atol: float | None = Field(
        1e-3, ge=0, description="prune() checks that the pruned model's outputs match the soft model's within "
                                "this tolerance × (1 + max |output|), and rolls back otherwise; None skips the check. "
                                "The default leaves room for float32/TF32 rounding on GPUs; real mismatches are O(1)")
    round_to: int | None = Field(
        None, ge=1, strict=True,
        description="prune() keeps every pruned layer at a multiple of this many channels (or its full width) by "
                    "keeping back the strongest removed structures, e.g. 8 or 64 for GPU tensor cores; the gmp "
                    "policy's masks keep such widths while training (its budget still removes at least `sparsity`), "
                    "and it is the step of gmp's latency budget. sparsify.measure.width_latency_table suggests a "
                    "value. None: no rounding")

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter(cls, v: Any) -> AdapterConfig:
        return _resolve(v, ADAPTERS, AdapterConfig, "adapter")

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> PolicyConfig:
        return _resolve(v, POLICIES, PolicyConfig, "policy")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"config schema_version {v} is newer than this sparsify ({SCHEMA_VERSION}); upgrade")
        return v

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> SparsifierConfig:
        """Load from YAML text or a path to a YAML file."""
        import yaml

        if not isinstance(text_or_path, (str, Path)):
            raise SparsifyError(f"from_yaml takes YAML text or a path, got {type(text_or_path).__name__}")
        text = str(text_or_path)
        looks_like_path = isinstance(text_or_path, Path) or ("\n" not in text and ":" not in text)
        if looks_like_path or ("\n" not in text and Path(text).is_file()):
            file = Path(text_or_path)
            if not file.is_file():
                raise SparsifyError(f"SparsifierConfig.from_yaml: {str(file)!r} is not an existing file (and YAML text "
                                    "would need 'adapter:' and 'policy:' keys); check the path")
            where, text = f"{file}", file.read_text()
        else:
            where = "the YAML text"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SparsifyError(f"SparsifierConfig.from_yaml: {where} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise SparsifyError(f"SparsifierConfig.from_yaml: {where} holds a {type(data).__name__}, not a mapping; "
                                "a config needs 'adapter:' and 'policy:' keys (see SparsifierConfig.to_yaml())")
        return cls.model_validate(data)
