"""Capture the values of chosen channel spaces by re-running the traced graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparsify.graph.builder import Space
from sparsify.graph.trace import TracedModel


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[tuple[int, Space, torch.Tensor]]]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.found: dict[int, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for i, (key, dim), index in self.wanted.get(n.name, []):
            value = out
            for k in key[len(n.name) + 1:].split(".") if key != n.name else ():  # (nested) tuple element
                value = value[int(k)]
            index = index.to(value.device)
            picked = value.index_select(dim, index).movedim(dim, 0)
            self.found[i] = picked.flatten(1) if picked.ndim > 1 else picked[:, None]  # 1-D: unbatched cells
        return out


def capture_channels(traced: TracedModel, requests: list[tuple[Space, torch.Tensor]]) -> list[torch.Tensor]:
    """For each (space, channel indices), the values those channels take on the example inputs.

    Each result has shape (len(index), everything else). Runs in eval mode under no_grad and
    restores every module's train/eval mode.
    """
    wanted: dict[str, list[tuple[int, Space, torch.Tensor]]] = {}
    for i, (space, index) in enumerate(requests):
        wanted.setdefault(space[0].split(".")[0], []).append((i, space, index))
    model = traced.model
    modes = {m: m.training for m in model.modules()}
    interp = _Capture(traced.graph_module, wanted)
    try:
        model.eval()
        with torch.no_grad():
            interp.run(*traced.inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [interp.found[i] for i in range(len(requests))]
