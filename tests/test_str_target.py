"""The STR controller's per-vector caps (vectorised) equal a plain per-vector computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.policies.str_target import cap_thresholds


def _plain(vectors: list[torch.Tensor], cap: float) -> torch.Tensor:
    out = []
    for m in vectors:
        allowed = int(np.floor(cap * len(m) + 1e-9))
        if allowed >= len(m):
            out.append(float("inf"))
            continue
        ordered = torch.sort(m.double()).values
        first_kept = ordered[allowed]
        below = ordered[ordered < first_kept]
        out.append(max(0.5 * (float(below[-1]) + float(first_kept)) if len(below) else 0.5 * float(first_kept),
                       1e-30))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("cap", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_caps_match_the_plain_computation_with_ties(cap: float) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        lengths = [int(x) for x in torch.randint(1, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)]
        vectors = [torch.randint(0, 5, (n,), generator=g).float() / 4 if trial % 2 else torch.rand(n, generator=g)
                   for n in lengths]  # odd trials: many ties
        caps = cap_thresholds(torch.cat(vectors), lengths, cap)
        assert torch.equal(caps, _plain(vectors, cap))
        for v, c in zip(vectors, caps, strict=True):  # and the cap does what it says (exact zeros stay zeros)
            assert int(((v.double() <= c) & (v > 0)).sum()) <= int(np.floor(cap * len(v) + 1e-9))
