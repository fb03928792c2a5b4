"""The ``fluctuation`` adapter (FLAP): Var(X)·‖W‖² scores, per-layer standardisation, bias compensation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph
from sparsify.adapters.fluctuation import FluctuationAdapter, FluctuationConfig
from sparsify.oneshot import apply_plan, make_plan


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6)).double()
    with torch.no_grad():
        model[0].bias += 1.5  # most hidden units active, with a mean far from 0 (as LLM activations have)
    return model


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # inputs with a non-zero mean: ReLU features have large means
    return [torch.randn(16, 8, generator=g, dtype=torch.float64) * 0.3 + 1.0 for _ in range(n)]


def _inputs(model: nn.Module, batches: list[torch.Tensor], layer: nn.Module) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(seen)


def test_score_is_variance_times_column_energy_and_standardised_per_layer() -> None:
    model = _mlp()
    batches = _data(4, 1)
    adapter = FluctuationAdapter(FluctuationConfig(standardize=False))
    [vector] = adapter.vectors(build_channel_graph(model, batches[0]), calibrate=False)
    adapter.calibrate(model, batches)
    x = _inputs(model, batches, model[2])
    torch.testing.assert_close(adapter.stats.mean["2"], x.mean(0))  # Chan's merge of 4 batches
    expected = x.var(0) * model[2].weight.detach().pow(2).sum(0)
    torch.testing.assert_close(vector.raw(), expected)
    standard = FluctuationAdapter(FluctuationConfig())
    [sv] = standard.vectors(build_channel_graph(model, batches[0]), calibrate=False)
    standard.calibrate(model, batches)
    z = (expected - expected.mean()) / expected.std()
    torch.testing.assert_close(sv.raw(), nn.functional.softplus(z))
    assert bool((sv.raw() > 0).all()) and torch.equal(sv.raw().argsort(), z.argsort())


def test_bias_compensation_reduces_the_error_of_one_shot_pruning() -> None:
    model = _mlp()
    calib, held_out = _data(8, 1), _data(4, 2)  # the same distribution, other samples
    x = calib[0]
    plan = make_plan(model, x, 0.5, unit="channels")
    errors = {}
    for compensate in (False, True):
        pruned = copy.deepcopy(model)
        result = apply_plan(pruned, x, plan, importance="fluctuation", calibration=calib, compensate=compensate)
        assert pruned[2].in_features == 16
        with torch.no_grad():
            errors[compensate] = sum(float((pruned(b) - model(b)).pow(2).mean()) for b in held_out)
        if compensate:
            [removed] = result.removed.values()
            mean = _inputs(model, calib, model[2]).mean(0)
            delta = model[2].weight.detach()[:, removed] @ mean[removed]
            torch.testing.assert_close(pruned[2].bias.detach(), model[2].bias.detach() + delta)
    assert errors[True] < 0.5 * errors[False], errors
    with pytest.raises(SparsifyError, match="fluctuation"):
        apply_plan(copy.deepcopy(model), x, plan, importance="filter_norm", compensate=True)


def test_gmp_prunes_exactly_and_compensation_applies_after_the_surgery() -> None:
    model = _mlp()
    calib = _data(4, 1)
    sp = Sparsifier(model, calib[0], adapter=FluctuationConfig(), policy=GMPConfig(sparsity=0.5, end_step=1))
    sp.adapter.calibrate(model, calib)
    sp.step()
    comp = sp.adapter.compensation(sp.zero_structures())
    with torch.no_grad():
        masked = model(calib[1])
    sp.prune()  # exact: the masked model's function (verify_atol), compensation not yet applied
    with torch.no_grad():
        assert (model(calib[1]) - masked).abs().max().item() <= 1e-10
    bias = model[2].bias.detach().clone()
    comp.apply()
    torch.testing.assert_close(model[2].bias.detach(), bias + comp.deltas["2"])
    with pytest.raises(SparsifyError, match="applied already"):
        comp.apply()


def test_llama_heads_are_aggregated_and_missing_biases_are_opt_in() -> None:
    pytest.importorskip("transformers")
    from sparsify.testing.hf_models import tiny_causal_lm

    model, x = tiny_causal_lm("llama")
    batches = [{"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    adapter = FluctuationAdapter(FluctuationConfig(standardize=False))
    vectors = adapter.vectors(build_channel_graph(model, x), calibrate=False)
    assert {v.group.kind for v in vectors} == {"kv_group", "channel"}
    adapter.calibrate(model, batches)
    heads = next(v for v in vectors if v.name.startswith("model.layers.0.self_attn"))
    o = model.model.layers[0].self_attn.o_proj
    per_channel = adapter.stats.var("model.layers.0.self_attn.o_proj") * o.weight.detach().pow(2).sum(0)
    torch.testing.assert_close(heads.raw(), per_channel.view(2, 32).sum(1))  # 2 KV groups of 2 heads × 16
    plan = make_plan(model, x, 0.5, unit="channels")
    plain, added = copy.deepcopy(model), copy.deepcopy(model)
    result = apply_plan(plain, x, plan, importance="fluctuation", calibration=batches, compensate=True)
    assert not result.compensation.applied and "model.layers.0.mlp.down_proj" in result.compensation.skipped
    assert plain.model.layers[0].mlp.down_proj.bias is None
    result = apply_plan(added, x, plan, importance="fluctuation", calibration=batches, compensate="add_bias")
    assert len(result.compensation.applied) == 4  # o_proj and down_proj of both layers got a bias
    assert added.model.layers[0].mlp.down_proj.bias.shape == (64,)
    errors = []
    with torch.no_grad():
        for pruned in (plain, added):
            errors.append(sum(float((pruned(**b).logits - model(**b).logits).pow(2).mean()) for b in batches))
    assert errors[1] < errors[0], errors


def test_added_biases_survive_save_pretrained_when_the_config_declares_them(tmp_path) -> None:
    """What docs/llm.md promises: LLaMA reloads the added o_proj/down_proj biases only with the config flags."""
    pytest.importorskip("transformers")
    from sparsify.hf import from_pretrained, save_pretrained
    from sparsify.testing.hf_models import tiny_causal_lm

    model, x = tiny_causal_lm("llama", dtype=torch.float32)
    batches = [{"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    apply_plan(model, x, make_plan(model, x, 0.5, unit="channels"), importance="fluctuation", calibration=batches,
               compensate="add_bias")
    with torch.no_grad():
        ref = model(**x).logits
    diffs = []
    for flag in (False, True):
        model.config.attention_bias = model.config.mlp_bias = flag
        save_pretrained(model, tmp_path / str(flag))
        back = from_pretrained(tmp_path / str(flag)).eval()
        with torch.no_grad():
            diffs.append((back(**x).logits - ref).abs().max().item())
    assert diffs[0] > 1e-3 and diffs[1] <= 1e-6, diffs  # dropped without the flags; zero sibling biases with them
