"""The op-rule registry: which rule declares the channel couplings of which fx node."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext
from sparsify.registry import Registry

RuleFn = Callable[[OpContext], None]


@dataclass(frozen=True)
class OpRule:
    """A rule function and the module types, functions and method names it covers."""

    kind: str
    fn: RuleFn
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    description: str = ""


OP_RULES: Registry[OpRule] = Registry(
    "op rule", "Register one with sparsify.extend.register_op_rule(kind, fn, modules=..., functions=..., methods=...)."
)
_BY_MODULE: dict[type[nn.Module], OpRule] = {}
_BY_FUNCTION: dict[Any, OpRule] = {}
_BY_METHOD: dict[str, OpRule] = {}
_BY_FUNCTION_NAME: dict[str, OpRule] = {}


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"


def register_op_rule(
    kind: str,
    fn: RuleFn,
    *,
    modules: Iterable[type[nn.Module]] = (),
    functions: Iterable[Any] = (),
    methods: Iterable[str] = (),
    description: str = "",
    override: bool = False,
) -> OpRule:
    """Register ``fn`` as the channel rule of the given module types, functions and tensor methods.

    Functions may be given as objects or as dotted names (``"torchvision.ops.stochastic_depth.
    stochastic_depth"``), so rules for optional packages need no import. ``fn(ctx)`` receives an
    :class:`~sparsify.graph.builder.OpContext` and declares, with
    ``ctx.same``/``ctx.pairs``/``ctx.member``/``ctx.block``/``ctx.fresh``/``ctx.mark_inexact``, how
    the channels of the node's inputs, outputs and parameters are coupled. Every output dim it does
    not declare is treated as a barrier.
    """
    rule = OpRule(kind, fn, tuple(modules), tuple(functions), tuple(methods), description or (fn.__doc__ or "").strip())
    targets = [(_BY_MODULE, m) for m in rule.modules]
    targets += [(_BY_FUNCTION_NAME if isinstance(f, str) else _BY_FUNCTION, f) for f in rule.functions]
    targets += [(_BY_METHOD, m) for m in rule.methods]
    if not override:
        for table, key in targets:
            if key in table:
                raise ValueError(
                    f"{getattr(key, '__name__', key)!r} already has op rule {table[key].kind!r}; "
                    "pass override=True to replace it."
                )
    OP_RULES.register(kind, rule, override=override)
    for table, key in targets:
        table[key] = rule
    return rule


def find_rule(node: fx.Node, gm: fx.GraphModule) -> OpRule | None:
    """The rule for a node, or None (the node is then a barrier)."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
        # A subclass inherits its base's rule only if it also inherits its forward().
        for base in cls.__mro__[1:]:
            if base in _BY_MODULE and cls.forward is base.forward:
                return _BY_MODULE[base]
        return None
    if node.op == "call_function":
        try:
            rule = _BY_FUNCTION.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        return rule or _BY_FUNCTION_NAME.get(_qualname(node.target))
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    return None


def list_op_rules(pattern: str = "*") -> list[str]:
    """Kinds of the registered op rules (fnmatch ``pattern``)."""
    return OP_RULES.list(pattern)
