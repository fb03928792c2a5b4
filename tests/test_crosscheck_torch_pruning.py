"""Cross-check our channel groups against Torch-Pruning's ``DependencyGraph`` on torchvision models.

Both sides are reduced to *couplings*: sets of ``(module name, "out" | "in")`` over Conv/Linear
layers whose channels must be removed together. A group of ours can hold several couplings (a
concat joins its inputs' groups into one component, but each input's channels still couple a
different set of layers), so each side is partitioned by the layer set each channel touches:
per structure for ours, per root channel for Torch-Pruning (TP). A coupling is keyed by its
earliest producing layer (module order). Every difference must be listed, with its reason, in
``KNOWN_DIFFERENCES``; a new one fails the test, and so does a listed one that no longer occurs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from sparsify._compat import import_torchvision
from sparsify.graph.channel_graph import ChannelGraph, build_channel_graph

tp = pytest.importorskip("torch_pruning")
torchvision = import_torchvision()

Layer = tuple[str, str]  # (module name, "out" | "in")
Coupling = frozenset[Layer]
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Difference:
    """One coupling on which the two graphs disagree.

    ``kind`` is ``mismatch`` (both couple channels of ``key`` but with different layers),
    ``ours_only`` (our prunable coupling that TP lacks), ``tp_only`` (TP coupling we lack) or
    ``blocked`` (TP prunes a coupling that we have but mark not prunable: ``detail`` says why).
    """

    kind: str
    key: str
    detail: str


# ---------------------------------------------------------------------------------------------
# Known differences: model → {(kind, fnmatch pattern on the key): reason}.
KNOWN_DIFFERENCES: dict[str, dict[tuple[str, str], str]] = {}


# ---------------------------------------------------------------------------------------------
def our_couplings(cg: ChannelGraph) -> tuple[dict[Coupling, str], dict[Coupling, str]]:
    """Couplings of our prunable groups (→ group name) and of our blocked ones (→ reason)."""
    model = cg.model
    weighted = {name for name, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    prunable: dict[Coupling, str] = {}
    blocked: dict[Coupling, str] = {}
    for g in cg.groups:
        layers_of: list[set[Layer]] = [set() for _ in range(g.width)]
        for m in g.members:
            if m.role in ("out", "in") and m.module in weighted:
                for s in np.unique(m.structure_of):
                    layers_of[int(s)].add((m.module, m.role))
        for layers in {frozenset(x) for x in layers_of if x}:
            if g.prunable:
                prunable[layers] = g.name
            else:
                blocked.setdefault(layers, g.why_not())
    return prunable, blocked


def tp_couplings(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module]) -> set[Coupling]:
    """Couplings of the groups ``DependencyGraph.get_all_groups`` roots at Conv/Linear outputs."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    found: set[Coupling] = set()
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_WEIGHTED):
        by_root: dict[int, set[Layer]] = {}
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, _WEIGHTED) or not len(item.idxs):
                continue
            role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            for r in item.root_idxs:
                by_root.setdefault(int(r), set()).add((names[module], role))
        found.update(frozenset(x) for x in by_root.values())
    return found


def _key(coupling: Coupling, order: dict[str, int]) -> str:
    producers = [n for n, role in coupling if role == "out"] or [n for n, _ in coupling]
    return min(producers, key=lambda n: order.get(n, len(order)))


def _show(layers: set[Layer] | frozenset[Layer]) -> str:
    return ", ".join(f"{n}:{r}" for n, r in sorted(layers))


def differences(model: nn.Module, cg: ChannelGraph, tp_found: set[Coupling]) -> list[Difference]:
    """Every coupling on which our prunable groups and TP's groups disagree."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    ours, blocked = our_couplings(cg)
    ours_by_key: dict[str, list[Coupling]] = {}
    for c in ours:
        ours_by_key.setdefault(_key(c, order), []).append(c)
    diffs: list[Difference] = []
    for c in sorted(tp_found - set(ours), key=lambda c: order.get(_key(c, order), 0)):
        key = _key(c, order)
        if c in blocked:
            diffs.append(Difference("blocked", key, f"{_show(c)} — we block it: {blocked[c]}"))
        elif key in ours_by_key:
            other = ours_by_key[key][0]
            diffs.append(Difference("mismatch", key, f"ours adds [{_show(other - c)}]; TP adds [{_show(c - other)}]"))
        else:
            diffs.append(Difference("tp_only", key, _show(c)))
    tp_keys = {_key(c, order) for c in tp_found}
    for c in sorted(set(ours) - tp_found, key=lambda c: order.get(_key(c, order), 0)):
        key = _key(c, order)
        if key not in tp_keys:
            diffs.append(Difference("ours_only", key, f"group '{ours[c]}': {_show(c)}"))
    return diffs


def unexplained(model_name: str, diffs: list[Difference]) -> tuple[list[Difference], list[tuple[str, str]]]:
    """Differences no KNOWN_DIFFERENCES entry explains, and entries that explain nothing."""
    known = KNOWN_DIFFERENCES.get(model_name, {})
    used: set[tuple[str, str]] = set()
    left = []
    for d in diffs:
        hits = [k for k in known if k[0] == d.kind and fnmatch.fnmatchcase(d.key, k[1])]
        used.update(hits)
        if not hits:
            left.append(d)
    return left, [k for k in known if k not in used]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    size: int = 64
    slow: bool = False


CASES = [
    Case("resnet18"),
    Case("resnet50"),
    Case("mobilenet_v2"),
    Case("mobilenet_v3_small"),
    Case("regnet_x_400mf"),
    Case("vgg11_bn", size=32),
    Case("densenet121", slow=True),
    Case("efficientnet_b0", slow=True),
    Case("googlenet", slow=True),
    Case("convnext_tiny", slow=True),
]


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)][-1]


def _cases() -> Iterator[object]:
    for c in CASES:
        marks = [pytest.mark.slow] if c.slow else []
        yield pytest.param(c, id=c.name, marks=marks)


def crosscheck(case: Case) -> list[Difference]:
    """Build both graphs on a fresh model and list their differences."""
    torch.manual_seed(0)
    builder = getattr(torchvision.models, case.name)
    kwargs = {"aux_logits": False, "init_weights": False} if case.name == "googlenet" else {}
    model = builder(weights=None, **kwargs).eval()
    x = torch.randn(1, 3, case.size, case.size)
    cg = build_channel_graph(model, x)
    tp_found = tp_couplings(model, x, ignored=[_classifier(model)])
    return differences(model, cg, tp_found)


@pytest.mark.parametrize("case", list(_cases()))
def test_groups_match_torch_pruning(case: Case) -> None:
    diffs = crosscheck(case)
    left, stale = unexplained(case.name, diffs)
    report = "\n".join(f"  {d.kind} {d.key}: {d.detail}" for d in left)
    assert not left, f"{len(left)} unexplained difference(s) from Torch-Pruning on {case.name}:\n{report}"
    assert not stale, f"KNOWN_DIFFERENCES entries for {case.name} that no longer occur: {stale}"
