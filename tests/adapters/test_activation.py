"""Wanda-style activation importance on a tiny LLaMA briefly trained on real text (pydoc topics)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import ActivationConfig, GMPConfig, Sparsifier
from sparsify.adapters.activation import ActivationAdapter
from sparsify.oneshot import apply_plan, make_plan

transformers = pytest.importorskip("transformers")
SEQ, BATCH = 64, 16


def _corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _batches(data: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([data[s:s + SEQ + 1] for s in torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)])
            for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    data = _corpus()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in _batches(train, 160, seed=0):
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, _batches(train, 8, seed=1), _batches(held_out, 6, seed=2)


def _loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(np.mean([model(input_ids=b[:, :-1], labels=b[:, :-1]).loss.item() for b in batches]))


def _calibration(batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b[:, :-1]} for b in batches]


def test_wanda_beats_magnitude_and_gmp_one_shot_is_exact(trained) -> None:
    model, calib, held_out = trained
    dense = _loss(model, held_out)
    assert dense < 2.6, f"the tiny LLaMA did not learn the text (held-out loss {dense:.2f})"
    example = {"input_ids": calib[0][:2, :-1]}
    plan = make_plan(model, example, 0.5, unit="channels", kinds={"channel"})
    assert len(plan.groups) == 2 and all(g.keep == 128 for g in plan.groups)  # the MLP groups (exact channels)
    losses = {}
    for importance in ("filter_norm", "activation"):
        pruned = copy.deepcopy(model)
        apply_plan(pruned, example, plan, importance=importance, calibration=_calibration(calib))
        assert pruned.model.layers[0].mlp.down_proj.in_features == 128
        losses[importance] = _loss(pruned, held_out)
    assert losses["activation"] <= losses["filter_norm"] + 1e-6, (dense, losses)
    assert dense < losses["activation"]  # pruning half the MLP neurons does cost something
    _gmp_one_shot_with_the_activation_adapter_is_exact_and_bounded(trained)  # one test: train the model once


def _gmp_one_shot_with_the_activation_adapter_is_exact_and_bounded(trained) -> None:
    """Sparsifier(adapter="activation", policy=gmp): calibration memory, the Wanda formula, exact prune."""
    model, calib, held_out = trained
    model = copy.deepcopy(model).double()
    example = {"input_ids": calib[0][:2, :-1]}
    sp = Sparsifier(model, example, adapter=ActivationConfig(), policy=GMPConfig(sparsity=0.5, end_step=1))
    adapter = sp.adapter
    assert isinstance(adapter, ActivationAdapter) and adapter.calibrated  # on the example inputs
    covered = {g.name for g in sp.groups}
    assert {g.name for g in sp.graph.prunable_groups() if "mlp" in g.name} <= covered
    assert covered == {g.name for g in sp.graph.prunable_groups() if g.exact}  # MLP neurons (and heads, if prunable)
    assert any("inexact" in why for why in adapter.skipped.values())  # the hidden width is left out
    adapter.calibrate(model, _calibration(calib[:1]))
    one = adapter.stats.nbytes()
    adapter.calibrate(model, _calibration(calib))  # 8 batches: the same few vectors, no activations kept
    consumers = {m.module for v in sp.vectors for m in v.handle["in"]}  # one float64 per input channel each
    assert adapter.stats.nbytes() == one == 8 * sum(model.get_submodule(n).in_features for n in consumers)
    assert adapter.stats.samples == len(calib)
    assert all(not m._forward_pre_hooks for m in model.modules())  # calibration hooks are removed
    # the importance is Σ_i |W_down[i, s]| · ‖X_s‖ over the intermediate activations X
    v = next(v for v in sp.vectors if v.name.startswith("model.layers.0.mlp"))
    x = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: x.append(a[0]))
    with torch.no_grad():
        for b in _calibration(calib):
            model(**b)
    handle.remove()
    xs = torch.cat([t.reshape(-1, 256) for t in x])
    w = model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(v.raw(), w.abs().sum(0) * xs.pow(2).sum(0).sqrt(), rtol=1e-6, atol=1e-9)
    sp.step()  # one-shot: the policy reaches its final sparsity at step 1
    soft = _loss(model, held_out)
    result = sp.prune()  # verify_atol: the pruned model computes what the masked model did
    assert sum(after == 128 for _, after in result.widths.values()) == 2  # the two MLPs
    assert abs(_loss(model, held_out) - soft) <= 1e-9
    # the same choice as apply_plan with Wanda importance on the same calibration data
    again = copy.deepcopy(trained[0]).double()
    plan = make_plan(again, example, 0.5, unit="channels")
    kept = apply_plan(again, example, plan, importance="activation", calibration=_calibration(calib))
    assert abs(_loss(again, held_out) - soft) <= 1e-9, kept.keep


def test_activation_adapter_on_a_residual_cnn_prunes_exactly() -> None:
    from sparsify.testing.models import residual_cnn
    from sparsify.testing.oracle import randomize_

    model, x = residual_cnn(torch.float64)
    randomize_(model.eval())
    sp = Sparsifier(model, x, adapter="activation", policy=GMPConfig(sparsity=0.5, end_step=1))
    batches = [torch.randn(3, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    sp.adapter.calibrate(model, batches)
    conv = model.layer1.conv1  # consumes the stem/residual channels (and nothing else in this group)
    inputs = []
    handle = conv.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    norm = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) for t in inputs]).pow(2).sum(0).sqrt()
    w = sp.adapter.stats.norm("layer1.conv1")
    torch.testing.assert_close(w, norm)
    sp.step()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()  # exact: verify_atol compares with the masked model, and so do we
    with torch.no_grad():
        assert (model(x) - soft).abs().max().item() <= 1e-10
    assert result.params_after < result.params_before
