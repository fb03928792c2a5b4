"""One-shot L1 filter pruning of a torchvision ResNet-18 with sparsify's channel graph.

Run: python examples/prune_resnet_l1.py [--fraction 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torchvision

from sparsify import build_channel_graph, prune_channels
from sparsify.graph.report import summary


def main(fraction: float = 0.5, size: int = 224) -> dict[str, int]:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, size, size)
    cg = build_channel_graph(model, x)
    print(summary(cg))
    plan = {}
    for group in cg.prunable_groups():
        # L1 norm of every producing filter, summed over the coupled layers of the group
        scores = np.zeros(group.width)
        for m in group.members:
            if m.role == "out":
                w = model.get_parameter(m.tensor).detach()
                np.add.at(scores, m.structure_of, w.abs().flatten(1).sum(1).numpy())
        plan[group.id] = np.argsort(scores)[: int(group.width * fraction)]
    report = prune_channels(cg, plan)
    print(f"params {report.params_before:,} → {report.params_after:,}")
    assert model(x).shape == (1, 1000)
    return {"params_before": report.params_before, "params_after": report.params_after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fraction", type=float, default=0.5)
    main(parser.parse_args().fraction)
