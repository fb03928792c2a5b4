"""Cross-check our channel groups against Torch-Pruning's ``DependencyGraph`` on torchvision models.

Both sides are reduced to *couplings*: sets of ``(module name, "out" | "in")`` over Conv/Linear
layers whose channels must be removed together. A group of ours can hold several couplings (a
concat joins its inputs' groups into one component, yet each input's channels reach different
layers), so each side is partitioned by the layers each channel touches: per structure for ours,
per root channel for Torch-Pruning (TP, ``get_all_groups`` rooted at Conv/Linear outputs, final
classifier ignored). Couplings found on both sides must also agree channel by channel. A coupling
is keyed by its earliest producing layer in module order. Every difference must be explained in
``KNOWN_DIFFERENCES``; a new one fails the test, and so does an entry that no longer occurs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from torch import nn

from sparsify.graph.channel_graph import ChannelGraph, build_channel_graph

tp = pytest.importorskip("torch_pruning")

Layer = tuple[str, str]  # (module name, "out" | "in")
Coupling = frozenset[Layer]
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Difference:
    """One coupling on which the two graphs disagree; ``key`` is its earliest producing layer.

    ``kind``: ``mismatch`` (both sides couple ``key``'s channels, with different layers),
    ``tp_only`` / ``ours_only`` (a coupling only one side has), ``blocked`` (TP prunes layers that
    we mark not prunable; ``detail`` says why) or ``index_mismatch`` (same layers, other channels).
    """

    kind: str
    key: str
    detail: str


_GROUPED_CONV = (
    "f.b is a grouped conv (group width 16 here). We remove whole conv groups, so f.a's outputs, "
    "f.b's inputs and outputs and f.c's inputs form ONE coupling whose structures are conv groups "
    "(exact, and f.b stays a valid grouped conv). TP's graph treats a grouped conv like a dense one "
    "(only depthwise convs tie inputs to outputs), so it couples f.a:out with f.b:in alone and roots "
    "a second group at f.b:out. TP keeps the conv valid elsewhere: its BasePruner prunes the same "
    "in-group offsets of every group (in/out_channel_groups), which the graph does not show. "
    "Deliberate choice on our side; per-offset structures are a possible later addition."
)

#: model → {(kind, fnmatch pattern on the key): reason}
KNOWN_DIFFERENCES: dict[str, dict[tuple[str, str], str]] = {
    "regnet_x_400mf": {
        ("mismatch", "trunk_output.block?.block?-*.f.a.0"): _GROUPED_CONV,
        ("tp_only", "trunk_output.block?.block?-*.f.b.0"): _GROUPED_CONV,
    },
    "vit_b_16": {
        ("blocked", "conv_proj"): (
            "The 768-wide hidden (residual) stream. TP prunes it through nn.MultiheadAttention with its "
            "MHA pruner (slicing in_proj/out_proj) and leaves hidden_dim for the user to patch by hand. "
            "We block it on purpose: MultiheadAttention is a barrier (rule 'attention_barrier', heads "
            "not modelled yet) and _process_input reshapes with the constant self.hidden_dim, which "
            "nothing would keep in sync."
        ),
    },
}


# ---------------------------------------------------------------------------------------------
IndexSet = frozenset[tuple[str, str, int]]  # (module, role, channel index) removed together


@dataclass
class Side:
    """One graph's couplings: layer set → the channel-index sets (one per structure) behind it."""

    index_sets: dict[Coupling, set[IndexSet]]
    label: dict[Coupling, str]  # ours: the group's name, or why it is not prunable


def _by_layers(per_structure: list[set[tuple[str, str, int]]]) -> dict[Coupling, set[IndexSet]]:
    found: dict[Coupling, set[IndexSet]] = {}
    for s in per_structure:
        if s:
            found.setdefault(frozenset((n, r) for n, r, _ in s), set()).add(frozenset(s))
    return found


def our_couplings(cg: ChannelGraph) -> tuple[Side, Side]:
    """Couplings of our prunable groups and of our not-prunable ones."""
    weighted = {name for name, m in cg.model.named_modules() if isinstance(m, _WEIGHTED)}
    prunable, blocked = Side({}, {}), Side({}, {})
    for g in cg.groups:
        per_structure: list[set[tuple[str, str, int]]] = [set() for _ in range(g.width)]
        for m in g.members:
            if m.role in ("out", "in") and m.module in weighted:
                for i, s in enumerate(m.structure_of.tolist()):
                    per_structure[s].add((m.module, m.role, i))
        side = prunable if g.prunable else blocked
        for c, sets in _by_layers(per_structure).items():
            side.index_sets.setdefault(c, set()).update(sets)
            side.label.setdefault(c, g.name if g.prunable else g.why_not())
    return prunable, blocked


def tp_couplings(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module]) -> Side:
    """Couplings of the groups ``DependencyGraph.get_all_groups`` roots at Conv/Linear outputs."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    side = Side({}, {})
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_WEIGHTED):
        per_root: dict[int, set[tuple[str, str, int]]] = {}
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, _WEIGHTED):
                continue
            role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            for i, r in zip(item.idxs, item.root_idxs, strict=True):
                per_root.setdefault(int(r), set()).add((names[module], role, int(i)))
        for c, sets in _by_layers(list(per_root.values())).items():
            side.index_sets.setdefault(c, set()).update(sets)
    return side


def _key(coupling: Coupling, order: dict[str, int]) -> str:
    producers = [n for n, role in coupling if role == "out"] or [n for n, _ in coupling]
    return min(producers, key=lambda n: order.get(n, len(order)))


def _show(layers: set[Layer] | frozenset[Layer]) -> str:
    return ", ".join(f"{n}:{r}" for n, r in sorted(layers))


def differences(model: nn.Module, cg: ChannelGraph, theirs: Side) -> tuple[list[Difference], int]:
    """Every coupling on which our prunable groups and TP's groups disagree, and how many agree."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    ours, blocked = our_couplings(cg)
    ours_by_key: dict[str, Coupling] = {}
    for c in ours.index_sets:
        ours_by_key.setdefault(_key(c, order), c)
    blocked_layers = {layer: why for c, why in blocked.label.items() for layer in c}
    diffs: list[Difference] = []
    agree = 0
    for c in sorted(theirs.index_sets, key=lambda c: order.get(_key(c, order), 0)):
        key = _key(c, order)
        if c in ours.index_sets:
            only_ours = ours.index_sets[c] - theirs.index_sets[c]
            if only_ours or theirs.index_sets[c] - ours.index_sets[c]:
                example = sorted(next(iter(only_ours)))[:4] if only_ours else []
                diffs.append(Difference("index_mismatch", key, f"{len(only_ours)} structure(s) of ours take "
                                                                f"other channels than TP's, e.g. {example}"))
            else:
                agree += 1
        elif all(layer in blocked_layers for layer in c):
            reasons = sorted({blocked_layers[layer] for layer in c})
            diffs.append(Difference("blocked", key, f"{_show(c)} — we block it: {' | '.join(reasons)}"))
        elif key in ours_by_key:
            other = ours_by_key[key]
            diffs.append(Difference("mismatch", key, f"ours adds [{_show(other - c)}]; TP adds [{_show(c - other)}]"))
        else:
            diffs.append(Difference("tp_only", key, _show(c)))
    tp_keys = {_key(c, order) for c in theirs.index_sets}
    for c in sorted(set(ours.index_sets) - set(theirs.index_sets), key=lambda c: order.get(_key(c, order), 0)):
        key = _key(c, order)
        if key not in tp_keys:
            diffs.append(Difference("ours_only", key, f"group '{ours.label[c]}': {_show(c)}"))
    return diffs, agree


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
    Case("densenet121"),
    Case("mobilenet_v2"),
    Case("mobilenet_v3_small"),
    Case("regnet_x_400mf"),
    Case("efficientnet_b0"),
    Case("vgg11_bn", size=32),
    Case("googlenet"),
    Case("convnext_tiny"),
    Case("vit_b_16", size=224, slow=True),
]


def _cases() -> Iterator[object]:
    for c in CASES:
        yield pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])


def crosscheck(tv: ModuleType, case: Case) -> tuple[list[Difference], int]:
    """Build both graphs on a fresh model; (differences, number of couplings that agree)."""
    kwargs = {"aux_logits": False, "init_weights": False} if case.name == "googlenet" else {}
    model = tv.models.get_model(case.name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, case.size, case.size)
    cg = build_channel_graph(model, x)
    classifier = [m for m in model.modules() if isinstance(m, _WEIGHTED)][-1]
    return differences(model, cg, tp_couplings(model, x, ignored=[classifier]))


@pytest.mark.parametrize("case", list(_cases()))
def test_groups_match_torch_pruning(tv: ModuleType, case: Case) -> None:
    diffs, agree = crosscheck(tv, case)
    left, stale = unexplained(case.name, diffs)
    report = "\n".join(f"  {d.kind} {d.key}: {d.detail}" for d in left)
    assert agree > 0, f"no coupling of {case.name} agrees with Torch-Pruning: the comparison is broken"
    assert not left, f"{len(left)} unexplained difference(s) from Torch-Pruning on {case.name}:\n{report}"
    assert not stale, f"KNOWN_DIFFERENCES entries for {case.name} that no longer occur: {stale}"


def test_unexplained_difference_is_reported() -> None:
    """The bookkeeping itself: a new difference is caught, a listed one is explained."""
    listed = Difference("tp_only", "trunk_output.block1.block1-0.f.b.0", "")
    new = Difference("mismatch", "stem.0", "")
    left, stale = unexplained("regnet_x_400mf", [listed, new])
    assert left == [new]
    assert stale == [("mismatch", "trunk_output.block?.block?-*.f.a.0")]
