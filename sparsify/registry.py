"""One small generic registry used for op rules, adapters and policies."""

from __future__ import annotations

import fnmatch
import re
from typing import Generic, TypeVar

T = TypeVar("T")

_KIND = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A name → object map that refuses duplicates and explains failed look-ups."""

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        self.hint = hint
        self._items: dict[str, T] = {}

    def check_kind(self, kind: str) -> None:
        if not isinstance(kind, str) or not _KIND.match(kind):
            example = "my_" + self.what.replace(" ", "_")
            raise ValueError(f"{self.what} kind {kind!r} must be lower_snake_case (e.g. {example!r}).")

    def register(self, kind: str, item: T, *, override: bool = False) -> T:
        self.check_kind(kind)
        if kind in self._items and not override:
            raise ValueError(
                f"{self.what} kind {kind!r} is already registered; pass override=True to replace it."
            )
        self._items[kind] = item
        return item

    def register_plugin(self, kind: str, config_cls: type, impl_cls: type, base: type, *,
                        override: bool = False) -> None:
        """Register a (config class, implementation) pair after checking that they fit together."""
        self.check_kind(kind)
        fields = getattr(config_cls, "model_fields", {})
        default_kind = fields["kind"].default if "kind" in fields else None
        if default_kind != kind:
            raise ValueError(f"{config_cls.__name__}.kind must default to {kind!r} (got {default_kind!r}); "
                             f"declare `kind: Literal[{kind!r}] = {kind!r}`.")
        if not (isinstance(impl_cls, type) and issubclass(impl_cls, base)):
            name = getattr(impl_cls, "__name__", impl_cls)
            raise TypeError(f"{name} must subclass {base.__module__}.{base.__name__}")
        impl_cls.kind = kind
        self.register(kind, (config_cls, impl_cls), override=override)

    def get(self, kind: str) -> T:
        try:
            return self._items[kind]
        except KeyError:
            raise KeyError(
                f"unknown {self.what} kind {kind!r}; registered: {sorted(self._items)}. {self.hint}"
            ) from None

    def __contains__(self, kind: object) -> bool:
        return kind in self._items

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._items if fnmatch.fnmatch(k, pattern))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
