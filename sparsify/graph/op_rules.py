"""The op-rule registry: which rule declares the channel couplings of which fx node.

The built-in rules live in ``sparsify.graph.rules`` (importing that package registers them). A rule
for one module type is best registered with ``sparsify.extend.register_module_type(cls, rule=fn)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext
from sparsify.registry import Registry, TypeRegistry

RuleFn = Callable[[OpContext], None]
_HINT = ("Register one with sparsify.extend.register_module_type(cls, rule=fn), or "
         "sparsify.extend.register_op_rule(kind, fn, modules=..., functions=..., methods=...).")


@dataclass(frozen=True)
class OpRule:
    """A rule function and the module types, functions and method names it covers."""

    kind: str
    fn: RuleFn
    modules: tuple[type[nn.Module] | str, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    description: str = ""


class OpRuleRegistry(Registry[OpRule]):
    """Op rules by kind, with the indexes that find the rule of a node: module types (a
    :class:`TypeRegistry`: class or dotted name), functions (object or dotted name) and method names."""

    def __init__(self) -> None:
        super().__init__("op rule", _HINT)
        self.modules: TypeRegistry[OpRule] = TypeRegistry("op rule", _HINT)
        self._functions: dict[Any, OpRule] = {}
        self._function_names: dict[str, OpRule] = {}
        self._methods: dict[str, OpRule] = {}

    def _targets(self, rule: OpRule) -> list[tuple[dict[Any, OpRule], Any]]:
        targets: list[tuple[dict[Any, OpRule], Any]] = []
        targets += [(self._function_names if isinstance(f, str) else self._functions, f) for f in rule.functions]
        targets += [(self._methods, m) for m in rule.methods]
        return targets

    def check_rule(self, rule: OpRule, *, override: bool = False) -> None:
        """Raise if ``rule`` is malformed or one of its kind and targets has another rule (unless ``override``)."""
        self.check_kind(rule.kind)
        if not callable(rule.fn):
            raise TypeError(f"op rule {rule.kind!r}: fn must be a callable fn(ctx: OpContext), got {rule.fn!r}.")
        if not override and rule.kind in self:
            raise ValueError(f"op rule kind {rule.kind!r} is already registered; pass override=True to replace it.")
        for m in rule.modules:
            if not isinstance(m, str) and not (isinstance(m, type) and issubclass(m, nn.Module)):
                raise TypeError(f"op rule {rule.kind!r}: modules must be nn.Module classes or dotted names, "
                                f"got {m!r}.")
            self.modules.check(m, rule, override=override)
        for f in rule.functions:
            if not isinstance(f, str) and not callable(f):
                raise TypeError(f"op rule {rule.kind!r}: functions must be callables or dotted names, got {f!r}.")
        for m in rule.methods:
            if not isinstance(m, str):
                raise TypeError(f"op rule {rule.kind!r}: methods must be method names (str), got {m!r}.")
        if not override:
            for table, key in self._targets(rule):
                if key in table:
                    raise ValueError(f"{getattr(key, '__name__', key)!r} already has op rule {table[key].kind!r}; "
                                     "pass override=True to replace it.")

    def add(self, rule: OpRule, *, override: bool = False) -> OpRule:
        """Register ``rule`` under its kind and index its targets (all checked before anything changes)."""
        self.check_rule(rule, override=override)
        self.register(rule.kind, rule, override=override)
        for m in rule.modules:
            self.modules.register(m, rule, override=override)
        for table, key in self._targets(rule):
            table[key] = rule
        return rule

    def find(self, node: fx.Node, gm: fx.GraphModule) -> OpRule | None:
        """The rule for a node, or None (the node is then a barrier)."""
        if node.op == "call_module":
            cls = type(gm.get_submodule(str(node.target)))
            # a subclass inherits its base's rule only if it also inherits its forward()
            return self.modules.find(cls, accept=lambda base: cls.forward is base.forward)
        if node.op == "call_function":
            try:
                rule = self._functions.get(node.target)
            except TypeError:  # unhashable target
                rule = None
            return rule or self._function_names.get(_qualname(node.target))
        if node.op == "call_method":
            return self._methods.get(str(node.target))
        return None


OP_RULES = OpRuleRegistry()


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"


def register_op_rule(
    kind: str,
    fn: RuleFn,
    *,
    modules: Iterable[type[nn.Module] | str] = (),
    functions: Iterable[Any] = (),
    methods: Iterable[str] = (),
    description: str = "",
    override: bool = False,
) -> OpRule:
    """Register ``fn`` as the channel rule of the given module types, functions and tensor methods.

    Module types and functions may be given as objects or as dotted names (``"torchvision.ops.
    stochastic_depth.stochastic_depth"``), so rules for optional packages need no import. ``fn(ctx)``
    receives an :class:`~sparsify.graph.builder.OpContext` and declares, with
    ``ctx.same``/``ctx.pairs``/``ctx.member``/``ctx.block``/``ctx.fresh``/``ctx.mark_inexact``, how
    the channels of the node's inputs, outputs and parameters are coupled. Every output dim it does
    not declare is treated as a barrier.
    """
    if not callable(fn):
        raise TypeError(f"register_op_rule({kind!r}, fn): fn must be a callable fn(ctx: OpContext), got {fn!r}.")
    if isinstance(modules, (str, type)) or isinstance(methods, str) or isinstance(functions, str):
        raise TypeError(f"register_op_rule({kind!r}): modules, functions and methods take sequences "
                        "(modules=[MyModule]), not a single item.")
    rule = OpRule(kind, fn, tuple(modules), tuple(functions), tuple(methods),
                  description or (fn.__doc__ or "").strip())
    return OP_RULES.add(rule, override=override)


def find_rule(node: fx.Node, gm: fx.GraphModule) -> OpRule | None:
    """The rule for a node, or None (the node is then a barrier)."""
    return OP_RULES.find(node, gm)


def list_op_rules(pattern: str = "*") -> list[str]:
    """Kinds of the registered op rules (fnmatch ``pattern``)."""
    return OP_RULES.list(pattern)


__all__ = ["OP_RULES", "OpRule", "OpRuleRegistry", "RuleFn", "find_rule", "list_op_rules", "register_op_rule"]
