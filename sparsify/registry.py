"""Registries: a generic name → object map (op rules), and the plugin kind of it (adapters, policies)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
C = TypeVar("C", bound=type)

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


class PluginRegistry(Registry[tuple[type, type]]):
    """Kinds bound to a (pydantic config class, implementation class) pair; ``make(config)`` builds one.

    ``register_plugin`` is also a class decorator: ``@register_adapter("my_kind", MyConfig)`` above the class.
    """

    def __init__(self, what: str, hint: str, base: type) -> None:
        super().__init__(what, hint)
        self.base = base

    @overload
    def register_plugin(self, kind: str, config_cls: type, impl_cls: None = None, *,
                        override: bool = False) -> Callable[[C], C]: ...

    @overload
    def register_plugin(self, kind: str, config_cls: type, impl_cls: C, *, override: bool = False) -> C: ...

    def register_plugin(self, kind: str, config_cls: type, impl_cls: Any = None, *, override: bool = False) -> Any:
        """Register ``impl_cls`` (a subclass of the base) for ``kind`` with its config class; without
        ``impl_cls``, return a class decorator that does it. Returns the implementation class."""
        if impl_cls is None:
            return lambda cls: self.register_plugin(kind, config_cls, cls, override=override)
        self.check_kind(kind)
        fields = getattr(config_cls, "model_fields", {})
        default_kind = fields["kind"].default if "kind" in fields else None
        if default_kind != kind:
            raise ValueError(f"{config_cls.__name__}.kind must default to {kind!r} (got {default_kind!r}); "
                             f"declare `kind: Literal[{kind!r}] = {kind!r}`.")
        if not (isinstance(impl_cls, type) and issubclass(impl_cls, self.base)):
            name = getattr(impl_cls, "__name__", impl_cls)
            raise TypeError(f"{name} must subclass {self.base.__module__}.{self.base.__name__}")
        impl_cls.kind = kind
        self.register(kind, (config_cls, impl_cls), override=override)
        return impl_cls

    def config_class(self, kind: str) -> type:
        return self.get(kind)[0]

    def make(self, config: Any) -> Any:
        """The implementation registered for ``config.kind``, built from ``config``."""
        _, cls = self.get(config.kind)
        return cls(config)
