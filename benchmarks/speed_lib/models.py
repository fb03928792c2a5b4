"""The benchmark's models (torchvision, random weights) and their MACs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsify._compat import import_torchvision
from sparsify.graph.cost import is_weight_key, module_macs, product_weight
from sparsify.graph.trace import trace

tv = import_torchvision()

DEFAULT_RATIOS = {"resnet50": [2.0, 4.0], "mobilenet_v2": [2.0, 4.0], "resnet18": [2.0], "vit_b_16": [1.5]}


def build(name: str, size: int) -> nn.Module:
    """A torchvision model without pretrained weights, seeded, in eval mode."""
    torch.manual_seed(0)
    if name.startswith("vit"):
        return getattr(tv.models, name)(weights=None, image_size=size).eval()
    return getattr(tv.models, name)(weights=None).eval()


def tp_ignored(name: str, model: nn.Module) -> list[nn.Module]:
    """TP's ignored layers: the classifier; for ViT everything but the MLP hidden layers (like ours)."""
    if name.startswith("vit"):
        keep = {layer.mlp[0] for layer in model.encoder.layers}
        return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))
                and m not in keep]
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per example: conv/linear layers (sparsify.graph.cost) + nn.MultiheadAttention."""
    return float(sum(module_macs(trace(model, x)).values())) + attention_macs(model, x)


def attention_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Per example: in/out projections and the two attention products of every nn.MultiheadAttention (a
    leaf that ``module_macs`` does not trace into). ExplicitMultiheadAttention needs nothing here: its
    projections and its scaled_dot_product_attention products are counted by ``module_macs``."""
    total = 0.0

    def hook(m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal total
        q = args[0]
        if q.ndim == 2:  # unbatched (L, E)
            tokens, batch = q.shape[0], 1
        else:
            tokens, batch = (q.shape[1], q.shape[0]) if m.batch_first else (q.shape[0], q.shape[1])
        e = m.embed_dim
        total += batch * (tokens * e * 3 * e + tokens * e * e + 2 * tokens * tokens * e)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total / x.shape[0]


class WeightMacs:
    """Fast MACs of a pruned copy of ``dense``: a conv/linear layer's MACs scale with its weight's size
    (pruning never changes spatial sizes or token counts), an attention product keyed by a projection
    (``f"{weight}@out"``) with that weight's output rows, other attention products and nn.MultiheadAttention
    (not pruned here) are fixed."""

    def __init__(self, dense: nn.Module, x: torch.Tensor) -> None:
        self.macs = module_macs(trace(dense, x))
        self.size = {k: self._size(dense, k) for k in self.macs}
        self.extra = attention_macs(dense, x)
        self.layers = float(sum(self.macs.values()))
        self.total = self.layers + self.extra

    @staticmethod
    def _size(model: nn.Module, key: str) -> int:
        """What a ``module_macs`` entry scales with: its weight's numel, its projection's output rows, or 1."""
        if is_weight_key(key):
            return model.get_parameter(key).numel()
        weight = product_weight(key)
        return model.get_parameter(weight).shape[0] if weight else 1

    def reduction(self, model: nn.Module) -> float:
        after = sum(m * self._size(model, k) / self.size[k] for k, m in self.macs.items())
        return self.total / (after + self.extra)

    def layer_fraction(self, ratio: float) -> float:
        """Fraction of the conv/linear MACs to remove so that the whole network has ``ratio``× fewer MACs."""
        return 1.0 - (self.total / ratio - self.extra) / self.layers


def unaligned(model: nn.Module, multiple: int = 8) -> int:
    """Conv/linear layers whose output width is not a multiple of ``multiple``."""
    return sum((m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features) % multiple != 0
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


def params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
