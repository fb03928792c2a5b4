"""One registration per module type: its op rule, leaf-ness, synced sizes and attribute sync.

``register_module_type(cls, rule=..., leaf=..., synced_sizes=..., sync=...)`` binds everything
sparsify needs to know about a module class (or a dotted class name, so optional packages need no
import). Each facet lives in one :class:`~sparsify.registry.TypeRegistry`: op rules in
``OP_RULES.modules``, leaves in ``trace.LEAF_MODULES``, and here ``SYNCED_SIZES`` and
``ATTRIBUTE_SYNCS`` (the table that ``sparsify.prune.attributes`` applies after surgery).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch.fx as fx
from torch import nn

from sparsify.graph.op_rules import OP_RULES, OpRule, RuleFn
from sparsify.graph.trace import LEAF_MODULES
from sparsify.registry import TypeRegistry, dotted_name

AttributeSync = Callable[[nn.Module, dict[str, Any]], None]
ModuleType = TypeVar("ModuleType", bound="type[nn.Module] | str")

#: Module types whose forward() computes every size it passes to view/reshape/expand/split/zeros
#: from tensor shapes or from attributes kept in sync with the weights. Inherited by subclasses
#: that keep the forward().
SYNCED_SIZES: TypeRegistry[bool] = TypeRegistry(
    "synced-sizes registration", "Declare one with sparsify.extend.register_module_type(cls, synced_sizes=True).")
#: ``fn(module, old_attributes)``: re-derives a module's attributes (in_channels, num_heads, …) from
#: its sliced tensors. Inherited by subclasses.
ATTRIBUTE_SYNCS: TypeRegistry[AttributeSync] = TypeRegistry(
    "attribute sync", "Declare one with sparsify.extend.register_module_type(cls, sync=fn).")


def _kind(cls: type[nn.Module] | str) -> str:
    """The op-rule kind of a module type: its class name in lower_snake_case (``ScaledTanh`` → ``scaled_tanh``)."""
    name = dotted_name(cls).rpartition(".")[2]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower().strip("_")


def _check_cls(cls: Any) -> None:
    if isinstance(cls, str):
        SYNCED_SIZES.check_key(cls)
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_type: cls must be an nn.Module class or a dotted class name "
                        f"('package.module.ClassName'), got {cls!r}.")


def register_module_type(
    cls: ModuleType | None = None,
    *,
    rule: RuleFn | None = None,
    leaf: bool = False,
    synced_sizes: bool = False,
    sync: AttributeSync | None = None,
    override: bool = False,
) -> Any:
    """Teach sparsify a module type in one call; returns ``cls``. Without ``cls``, a class decorator.

    - ``rule``: its op rule ``fn(ctx: OpContext)`` (registered under the kind ``snake_case(ClassName)``);
      subclasses that keep its forward() use it too.
    - ``leaf=True``: the tracer keeps its calls as single nodes (needed for a rule to see the module
      call rather than the ops inside; also for code fx cannot trace).
    - ``synced_sizes=True``: its forward() reads every size it passes to view/reshape/split/zeros from
      tensor shapes or from attributes that its attribute sync keeps up to date, so the constants a
      graph holds for them (torch.export writes all sizes as constants) follow pruning.
    - ``sync``: ``fn(module, old_attributes)`` that re-derives its attributes after its tensors (or a
      descendant's) are sliced.

    ``cls`` may be a dotted class name (``"transformers.pytorch_utils.Conv1D"``). A facet already bound
    to something else raises ``ValueError`` unless ``override=True``; all facets are checked before any
    is registered.
    """
    if cls is None:
        return lambda c: register_module_type(c, rule=rule, leaf=leaf, synced_sizes=synced_sizes, sync=sync,
                                              override=override)
    _check_cls(cls)
    for name, value in (("leaf", leaf), ("synced_sizes", synced_sizes), ("override", override)):
        if not isinstance(value, bool):
            raise TypeError(f"register_module_type({dotted_name(cls)}): {name} must be True or False, got {value!r}.")
    for name, fn in (("rule", rule), ("sync", sync)):
        if fn is not None and not callable(fn):
            raise TypeError(f"register_module_type({dotted_name(cls)}): {name} must be a callable, got {fn!r}.")
    if rule is None and sync is None and not leaf and not synced_sizes:
        raise ValueError(f"register_module_type({dotted_name(cls)}) binds nothing: pass rule=, leaf=True, "
                         "synced_sizes=True and/or sync=.")
    op_rule = None
    if rule is not None:
        op_rule = OpRule(_kind(cls), rule, (cls,), description=(rule.__doc__ or "").strip())
        OP_RULES.check_rule(op_rule, override=override)
    if leaf:
        LEAF_MODULES.check(cls, True, override=override)
    if synced_sizes:
        SYNCED_SIZES.check(cls, True, override=override)
    if sync is not None:
        ATTRIBUTE_SYNCS.check(cls, sync, override=override)
    if op_rule is not None:
        OP_RULES.add(op_rule, override=override)
    if leaf:
        LEAF_MODULES.register(cls, True, override=override)
    if synced_sizes:
        SYNCED_SIZES.register(cls, True, override=override)
    if sync is not None:
        ATTRIBUTE_SYNCS.register(cls, sync, override=override)
    return cls


def _same_forward(cls: type) -> Callable[[type], bool]:
    return lambda base: getattr(cls, "forward", None) is getattr(base, "forward", None)


def class_has_synced_sizes(cls: type | str) -> bool:
    """Whether ``cls`` (or a base whose forward() it keeps) is declared with synced sizes."""
    if isinstance(cls, str):
        return SYNCED_SIZES.registered(cls) is not None
    return SYNCED_SIZES.find(cls, accept=_same_forward(cls)) is not None


def sizes_are_synced(node: fx.Node) -> bool:
    """Whether ``node`` runs in the code of a module type declared with synced sizes (its innermost module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    _, cls = list(stack.values())[-1]
    return class_has_synced_sizes(cls)


def attribute_sync_of(module: nn.Module) -> AttributeSync | None:
    """The attribute sync of ``module``'s class (or its nearest base that has one), else None."""
    return ATTRIBUTE_SYNCS.find(type(module))
