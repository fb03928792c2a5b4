"""Random small CNN-ish DAG architectures for property-testing the exactness oracle.

An architecture is a JSON-serialisable *spec*: a list of layer dicts. ``spec[0]`` is the input
(``{"op": "input", "channels": C, "size": S}``), ``spec[-1]`` the head; every other entry reads the
outputs of earlier entries by index (``"x"``, ``"y"``, ``"xs"``). ``architectures()`` is a hypothesis
strategy drawing specs; ``build(spec)`` turns one into an fx-traceable ``nn.Module`` (the forward is a
fixed loop over the static spec, which fx unrolls) and an example input. Regression examples in tests
are written as literal specs.

Layer kinds (``op``): ``conv`` (kernel 1/3, padding, stride 1/2, dense/depthwise/grouped), ``norm``
(``bn``, ``gn``, ``in`` = affine InstanceNorm, ``ln`` = LayerNorm over channels via permute), ``act``
(``relu``, ``gelu``), ``gate`` (``x * sigmoid(y)``), ``add`` (residual, ``match`` inserts a 1×1 conv on
``y``), ``cat``, ``chunk`` (chunk(2), process one half, cat), ``shuffle`` (view/transpose/view),
``heads`` (view into ``g`` heads, a per-head op, view back), ``pool`` (2×2 max/avg) and ``head``
(adaptive average pool or flatten with spatial size, then linear).

Model-side misuse (issue #17): a conv may carry ``"wn": true`` (``weight_norm``: its channels must be
barriers naming the fix, the rest still prunes exactly) and the input entry a ``"wrap"``
(``data_parallel`` / ``compile``: the wrapped model must be refused with how to unwrap, the unwrapped one
is then checked).

``check_spec(spec, keep_bias)`` is the property: the oracle on one spec. Only ``architectures()``
needs hypothesis (a dev extra); the rest imports and runs without it.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sparsify.errors import InexactPruneError, TraceError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.testing.oracle import check_exactness, randomize_

if TYPE_CHECKING:
    from hypothesis import strategies as st

Spec = list[dict[str, Any]]
Shape = tuple[int, int]  # (channels, spatial size; images are square)

MAX_CHANNELS = 16
MAX_SIZE = 8
MAX_LAYERS = 7  # plus input and head: at most 8 computing nodes
BATCH = 2
FRACTION = 0.5  # of every prunable group's structures zeroed by check_spec

WRAPPERS = ("data_parallel", "compile")  # what build() may wrap the model in (spec[0]["wrap"])
OPS = ("conv", "act", "norm", "add", "cat", "gate", "chunk", "shuffle", "heads", "pool")
_WEIGHTED_OPS = ("conv",) * 3 + OPS[1:] + ("norm", "add")  # convs make prunable groups; draw them more often


def _divisors(n: int, low: int = 2) -> list[int]:
    return [d for d in range(low, n + 1) if n % d == 0]


def _conv_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def shapes(spec: Spec) -> list[Shape]:
    """The (channels, size) of every entry's output but the head's; raises ``ValueError`` on an
    inconsistent spec."""
    if spec[0]["op"] != "input":
        raise ValueError("spec[0] must be the input")
    out: list[Shape] = [(spec[0]["channels"], spec[0]["size"])]
    for i, layer in enumerate(spec[1:-1], 1):
        op = layer["op"]
        c, s = out[layer["x"]] if "x" in layer else (0, 0)
        if op == "conv":
            g = layer["groups"]
            if c % g or layer["cout"] % g:
                raise ValueError(f"layer {i}: groups {g} does not divide {c}→{layer['cout']}")
            s = _conv_size(s, layer["k"], layer["stride"], layer["pad"])
            c = layer["cout"]
        elif op == "norm" and layer["kind"] == "gn" and c % layer["groups"]:
            raise ValueError(f"layer {i}: GroupNorm groups {layer['groups']} do not divide {c}")
        elif op in ("add", "gate"):
            cy, sy = out[layer["y"]]
            if sy != s or (cy != c and not layer.get("match")):
                raise ValueError(f"layer {i}: shapes {(c, s)} and {(cy, sy)} differ")
        elif op == "cat":
            parts = [out[j] for j in layer["xs"]]
            if len({p[1] for p in parts}) != 1:
                raise ValueError(f"layer {i}: cat of different sizes {parts}")
            c, s = sum(p[0] for p in parts), parts[0][1]
        elif op == "chunk" and c % 2:
            raise ValueError(f"layer {i}: chunk(2) of {c} channels")
        elif op in ("shuffle", "heads") and c % layer["groups"]:
            raise ValueError(f"layer {i}: {layer['groups']} groups do not divide {c}")
        elif op == "pool":
            s = s // 2
        if s < 1:
            raise ValueError(f"layer {i}: spatial size {s}")
        out.append((c, s))
    return out


# ----- strategy ----------------------------------------------------------------------------------
def _strategies() -> ModuleType:
    """``hypothesis.strategies``, or an ImportError that says how to install it."""
    try:
        from hypothesis import strategies
    except ImportError as exc:
        raise ImportError("sparsify.testing.fuzz.architectures() needs hypothesis, a development extra: "
                          "pip install 'sparsify-structured[dev]'") from exc
    return strategies


def _pick(draw: st.DrawFn, n: int, label: str) -> int:
    """An earlier node: the latest half of the time (a chain is the simplest DAG, and shrinks to it)."""
    st = _strategies()
    return n - 1 - (draw(st.integers(0, n - 1), label=label) if draw(st.booleans(), label=label) else 0)


def _draw_layer(draw: st.DrawFn, out: list[Shape], singleton_heads: bool) -> dict[str, Any] | None:
    st = _strategies()
    n = len(out)
    op = "conv" if n == 1 else draw(st.sampled_from(_WEIGHTED_OPS), label="op")  # layer 1 is a conv stem
    x = _pick(draw, n, "x")
    c, s = out[x]
    if op == "conv":
        k = draw(st.sampled_from((1, 3)), label="k")
        pad = draw(st.sampled_from((k // 2, 0, 1)), label="pad")
        stride = draw(st.sampled_from((1, 2)), label="stride")
        if _conv_size(s, k, stride, pad) < 1:
            return None
        mode = draw(st.sampled_from(("dense", "depthwise", "grouped")), label="mode")
        if mode == "depthwise":
            cout, groups = c * draw(st.integers(1, max(1, MAX_CHANNELS // c)), label="mult"), c
        else:
            cout = draw(st.integers(1, MAX_CHANNELS), label="cout")
            common = [g for g in _divisors(c) if cout % g == 0]
            groups = draw(st.sampled_from(common), label="groups") if mode == "grouped" and common else 1
        return {"op": "conv", "x": x, "cout": cout, "k": k, "stride": stride, "pad": pad, "groups": groups,
                "bias": draw(st.booleans(), label="bias"), "wn": draw(st.integers(0, 7), label="wn") == 0}
    if op == "act":
        return {"op": "act", "x": x, "fn": draw(st.sampled_from(("relu", "gelu")), label="fn")}
    if op == "norm":
        kind = draw(st.sampled_from(("bn", "gn", "in", "ln")), label="kind")
        layer = {"op": "norm", "x": x, "kind": kind}
        if kind == "gn":
            layer["groups"] = draw(st.sampled_from(_divisors(c, 1)), label="gn_groups")
        if kind == "in" and s == 1:
            return None  # InstanceNorm needs more than one value per channel
        return layer
    if op in ("add", "gate"):
        same = [j for j in range(n) if out[j][1] == s and (op == "add" or out[j][0] == c)]
        y = draw(st.sampled_from(same[::-1]), label="y")
        layer = {"op": op, "x": x, "y": y}
        if op == "add":
            layer["match"] = out[y][0] != c or draw(st.booleans(), label="match")
        return layer
    if op == "cat":
        same = [j for j in range(n) if out[j][1] == s]
        xs = [x, *draw(st.lists(st.sampled_from(same[::-1]), min_size=1, max_size=2), label="xs")]
        if sum(out[j][0] for j in xs) > MAX_CHANNELS:
            return None
        return {"op": "cat", "xs": xs}
    if op == "chunk":
        if c % 2:
            return None
        return {"op": "chunk", "x": x, "fn": draw(st.sampled_from(("conv", "relu", "conv_both")), label="fn"),
                "swap": draw(st.booleans(), label="swap")}
    if op in ("shuffle", "heads"):
        divs = [g for g in _divisors(c) if g < c] or (_divisors(c) if singleton_heads else [])
        if not divs:
            return None
        layer = {"op": op, "x": x, "groups": draw(st.sampled_from(divs), label="groups"),
                 "dyn": draw(st.booleans(), label="dyn")}
        if op == "heads":
            layer["fn"] = draw(st.sampled_from(("none", "relu", "scale", "softmax", "transpose")), label="fn")
        return layer
    if op == "pool":
        if s < 2:
            return None
        return {"op": "pool", "x": x, "kind": draw(st.sampled_from(("max", "avg")), label="kind")}
    raise AssertionError(op)


def architectures(max_layers: int = MAX_LAYERS, singleton_heads: bool = True) -> st.SearchStrategy[Spec]:
    """A hypothesis strategy of random specs: input, a conv stem and up to ``max_layers - 1`` more layers
    over earlier nodes, a linear head. ``singleton_heads=False`` never views C channels as C groups of one."""
    return _strategies().composite(_draw_spec)(max_layers, singleton_heads)


def _draw_spec(draw: st.DrawFn, max_layers: int, singleton_heads: bool) -> Spec:
    st = _strategies()
    spec: Spec = [{"op": "input", "channels": draw(st.integers(1, 6), label="in_channels"),
                   "size": draw(st.integers(2, MAX_SIZE), label="size"),
                   "wrap": draw(st.sampled_from((None,) * 6 + WRAPPERS), label="wrap")}]
    out = shapes([*spec, {}])
    for _ in range(draw(st.integers(1, max_layers), label="n_layers")):
        layer = _draw_layer(draw, out, singleton_heads)
        if layer is None:
            continue
        spec.append(layer)
        out = shapes([*spec, {}])
    x = _pick(draw, len(out), "head_x")
    kind = draw(st.sampled_from(("pool", "flatten")), label="head")
    spec.append({"op": "head", "x": x, "kind": kind, "out": draw(st.integers(1, 5), label="head_out")})
    return spec


# ----- builder ------------------------------------------------------------------------------------
class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, via permute (ConvNeXt style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FuzzNet(nn.Module):
    """The module a spec describes; ``forward`` is a fixed loop over the spec, unrolled by fx."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = shapes(spec)
        self.layers = nn.ModuleDict()
        for i, layer in enumerate(spec[1:], 1):
            module = self._module(layer, self.shapes)
            if module is not None:
                self.layers[str(i)] = module

    @staticmethod
    def _module(layer: dict[str, Any], out: list[Shape]) -> nn.Module | None:
        op = layer["op"]
        c, s = out[layer["x"]] if "x" in layer else (0, 0)
        if op == "conv":
            conv = nn.Conv2d(c, layer["cout"], layer["k"], layer["stride"], layer["pad"], groups=layer["groups"],
                             bias=layer["bias"])
            return weight_norm(conv) if layer.get("wn") else conv
        if op == "norm":
            kind = layer["kind"]
            if kind == "bn":
                return nn.BatchNorm2d(c)
            if kind == "gn":
                return nn.GroupNorm(layer["groups"], c)
            if kind == "in":
                return nn.InstanceNorm2d(c, affine=True)
            return _ChannelLayerNorm(c)
        if op == "add" and layer["match"]:
            return nn.Conv2d(out[layer["y"]][0], c, 1)
        if op == "chunk" and layer["fn"] != "relu":
            half = c // 2
            if layer["fn"] == "conv":
                return nn.Sequential(nn.Conv2d(half, half, 1), nn.ReLU())
            return nn.ModuleList([nn.Conv2d(half, half, 1), nn.Conv2d(half, half, 3, padding=1, groups=half)])
        if op == "head":
            features = c if layer["kind"] == "pool" else c * s * s
            return nn.Linear(features, layer["out"])
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i, layer in enumerate(self.spec[1:], 1):
            nodes.append(self._layer(i, layer, nodes))
        return nodes[-1]

    def _layer(self, i: int, layer: dict[str, Any], nodes: list[torch.Tensor]) -> torch.Tensor:
        op = layer["op"]
        x = nodes[layer["x"]] if "x" in layer else None
        m = self.layers[str(i)] if str(i) in self.layers else None
        if op in ("conv", "norm"):
            return m(x)
        if op == "act":
            return F.relu(x) if layer["fn"] == "relu" else F.gelu(x)
        if op == "gate":
            return x * torch.sigmoid(nodes[layer["y"]])
        if op == "add":
            y = nodes[layer["y"]]
            return x + (m(y) if m is not None else y)
        if op == "cat":
            return torch.cat([nodes[j] for j in layer["xs"]], dim=1)
        if op == "chunk":
            a, b = x.chunk(2, dim=1)
            if layer["fn"] == "relu":
                b = F.relu(b)
            elif layer["fn"] == "conv":
                b = m(b)
            else:
                a, b = m[0](a), m[1](b)
            return torch.cat((b, a) if layer["swap"] else (a, b), dim=1)
        if op in ("shuffle", "heads"):
            return self._grouped_view(layer, x, self.shapes[layer["x"]])
        if op == "pool":
            return F.max_pool2d(x, 2) if layer["kind"] == "max" else F.avg_pool2d(x, 2)
        if op == "head":
            if layer["kind"] == "pool":
                x = F.adaptive_avg_pool2d(x, 1)
            return m(torch.flatten(x, 1))
        raise AssertionError(op)

    @staticmethod
    def _grouped_view(layer: dict[str, Any], x: torch.Tensor, shape: Shape) -> torch.Tensor:
        g = layer["groups"]
        if layer["dyn"]:
            b, c, h, w = x.size()
        else:
            (c, h), b = shape, BATCH
            w = h
        y = x.view(b, g, c // g, h, w)
        if layer["op"] == "shuffle":
            return y.transpose(1, 2).contiguous().view(b, c, h, w)
        fn = layer["fn"]
        if fn == "relu":
            y = F.relu(y)
        elif fn == "scale":
            y = y * 0.5
        elif fn == "softmax":
            y = torch.softmax(y, dim=2)  # mixes the channels of a head: must not be treated as element-wise
        elif fn == "transpose":
            y = y.transpose(3, 4)
        return y.reshape(b, c, h, w)


def build(spec: Spec, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The module of ``spec`` (in ``dtype``, in the wrapper ``spec[0]["wrap"]`` names) and an example input
    of batch size 2."""
    torch.manual_seed(seed)
    model = FuzzNet(spec).to(dtype)
    c, s = spec[0]["channels"], spec[0]["size"]
    wrap = spec[0].get("wrap")
    if wrap is not None:
        model = nn.DataParallel(model) if wrap == "data_parallel" else torch.compile(model)
    return model, torch.randn(BATCH, c, s, s, dtype=dtype)


_UNWRAP = {"data_parallel": ("module", ".module"), "compile": ("_orig_mod", "._orig_mod")}


def _check_wrapper_refused(model: nn.Module, x: torch.Tensor, wrap: str) -> nn.Module:
    """The wrapped model is refused with how to unwrap it; returns the unwrapped model."""
    attr, fix = _UNWRAP[wrap]
    try:
        build_channel_graph(model, x)
    except TraceError as exc:
        if fix not in str(exc):
            raise AssertionError(f"the error for a {wrap} wrapper does not say how to unwrap ({fix}): {exc}") from exc
    else:
        raise AssertionError(f"a model in a {wrap} wrapper was accepted")
    return getattr(model, attr)


def _check_parametrized_blocked(model: nn.Module, x: torch.Tensor, spec: Spec) -> None:
    """Every group with a member on a weight_norm conv is a barrier whose reason names the fix."""
    convs = {f"layers.{i}.weight" for i, layer in enumerate(spec) if layer.get("wn")}
    for g in build_channel_graph(model, x).groups:
        if any(m.tensor in convs for m in g.members) and not any("remove_parametrizations" in b for b in g.blocked):
            raise AssertionError(f"group '{g.name}' reads a weight_norm conv but is not a barrier naming the fix: "
                                 f"{g.blocked}; {spec}")


def check_spec(spec: Spec, keep_bias: bool, seed: int = 0) -> str:
    """Run the oracle on ``spec`` in float64 (``FRACTION`` of every exact group zeroed and pruned) and raise
    AssertionError unless the pruned model computes what the soft one did; returns what happened, e.g.
    ``"pruned 2 groups"`` or ``"trace error"`` (for hypothesis' ``event``)."""
    model, x = build(spec, torch.float64)
    if spec[0].get("wrap"):
        model = _check_wrapper_refused(model, x, spec[0]["wrap"])
    randomize_(model, seed)
    try:
        if any(layer.get("wn") for layer in spec):
            _check_parametrized_blocked(model, x, spec)
        r = check_exactness(model, x, FRACTION, seed, keep_bias=keep_bias)
    except TraceError:
        return "trace error"
    except InexactPruneError:
        if keep_bias:
            return "inexact (keep_bias)"
        raise
    if r.max_abs_diff > 1e-9 * (1 + r.output_scale):
        raise AssertionError(f"pruning changed the outputs by {r.max_abs_diff:.3g} (scale {r.output_scale:.3g}, "
                             f"keep_bias={keep_bias}, seed={seed}): {spec}")
    return f"pruned {min(r.groups_pruned, 3)}{'+' if r.groups_pruned >= 3 else ''} groups"
