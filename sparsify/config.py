"""``SparsifierConfig``: adapter + policy configs, open to user-registered kinds, YAML/JSON round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from sparsify.adapters import ADAPTERS, AdapterConfig
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

    model_config = ConfigDict(extra="forbid", frozen=True)
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

        is_path = isinstance(text_or_path, Path) or ("\n" not in text_or_path and Path(text_or_path).is_file())
        text = Path(text_or_path).read_text() if is_path else text_or_path
        return cls.model_validate(yaml.safe_load(text))
