"""Registries: a generic name → object map (op rules), the plugin kind of it (adapters, policies), and
the class → object map (module types: leaf, synced sizes, attribute syncs, module op rules)."""

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

    def __init__(self, what: str, hint: str, *, pattern: re.Pattern[str] = _KIND) -> None:
        self.what = what
        self.hint = hint
        self.pattern = pattern
        self._items: dict[str, T] = {}

    def check_kind(self, kind: str) -> None:
        if not isinstance(kind, str) or not self.pattern.match(kind):
            example = "my_" + self.what.replace(" ", "_")
            form = "lower_snake_case" if self.pattern is _KIND else f"of the form {self.pattern.pattern!r}"
            raise ValueError(f"{self.what} kind {kind!r} must be {form} (e.g. {example!r}).")

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


def dotted_name(obj: Any) -> str:
    """``module.qualname`` of a class or function (a string is returned as it is)."""
    return obj if isinstance(obj, str) else f"{obj.__module__}.{obj.__qualname__}"


_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_<>][\w<>]*)+$")


class TypeRegistry(Generic[T]):
    """A map from classes (or functions) to objects; a key is the object itself or its dotted name
    (``"transformers.pytorch_utils.Conv1D"``: optional packages need no import).

    A class's look-up walks its MRO (``find``), checking each base and its dotted name. Registering the
    same object again for a key is a no-op; a different one raises unless ``override=True``.
    """

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        self.hint = hint
        self._items: dict[Any, T] = {}

    def check_key(self, key: Any) -> None:
        if isinstance(key, str):
            if not _DOTTED.match(key):
                raise ValueError(f"{self.what}: {key!r} is not a dotted name; write 'package.module.ClassName'.")
        elif not hasattr(key, "__module__") or not hasattr(key, "__qualname__"):
            raise TypeError(f"{self.what}: expected a class, a function or a dotted name, got {key!r}.")

    def registered(self, key: Any) -> T | None:
        """What is registered for exactly ``key`` (the object or its dotted name), else None."""
        if not isinstance(key, str) and key in self._items:
            return self._items[key]
        name = dotted_name(key)
        if name in self._items:
            return self._items[name]
        if isinstance(key, str):
            return next((v for k, v in self._items.items() if not isinstance(k, str) and dotted_name(k) == key), None)
        return None

    def check(self, key: Any, item: T, *, override: bool = False) -> None:
        """Raise if ``key`` is malformed or bound to another object (unless ``override``)."""
        self.check_key(key)
        existing = self.registered(key)
        if existing is not None and existing is not item and not override:
            raise ValueError(f"{self.what} for {dotted_name(key)!r} is already registered ({existing!r}); "
                             "pass override=True to replace it.")

    def register(self, key: Any, item: T, *, override: bool = False) -> T:
        self.check(key, item, override=override)
        if override:  # a binding under the other spelling (object / dotted name) of the key goes too
            for k in [k for k in self._items if dotted_name(k) == dotted_name(key)]:
                del self._items[k]
        self._items[key] = item
        return item

    def find(self, obj: Any, accept: Callable[[type], bool] | None = None) -> T | None:
        """The item of ``obj`` (a class: of the first base in its MRO that has one and that ``accept``
        takes, if given), else None."""
        for base in obj.__mro__ if isinstance(obj, type) else (obj,):
            item = self.registered(base)
            if item is not None and (accept is None or base is obj or accept(base)):
                return item
        return None

    def get(self, obj: Any) -> T:
        item = self.find(obj)
        if item is None:
            raise KeyError(f"no {self.what} for {dotted_name(obj)!r} (nor its bases); registered: "
                           f"{self.list()}. {self.hint}")
        return item

    def __contains__(self, obj: object) -> bool:
        return self.find(obj) is not None

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in {dotted_name(k) for k in self._items} if fnmatch.fnmatch(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        return sorted(((dotted_name(k), v) for k, v in self._items.items()), key=lambda kv: kv[0])
