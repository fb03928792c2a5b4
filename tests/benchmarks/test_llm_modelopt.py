"""The ModelOpt FastNAS peer of benchmarks/llm.py on a tiny LLaMA, briefly trained on the CPU (skipped without it)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("modelopt.torch.prune")

from benchmarks.llm_lib import peers
from benchmarks.llm_lib.budget import count_params, target_params, within
from benchmarks.llm_lib.models import llama_config
from benchmarks.llm_lib.ours import Calibration

VOCAB = 320


def _chains(successor: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that follow ``successor`` from a random first token: learnable, so pruning costs loss."""
    ids = torch.empty(count, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for i in range(1, length):
        ids[:, i] = successor[ids[:, i - 1]]
    return ids


def _calibration(successor: torch.Tensor, generator: torch.Generator) -> Calibration:
    ids = _chains(successor, 4, 32, generator)
    return Calibration(batches=[{"input_ids": b} for b in ids.split(2)], example={"input_ids": ids[:1, :16]},
                       labeled=[{"input_ids": b, "labels": b} for b in ids.split(2)])


def _llama(layers: int, intermediate: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = llama_config(VOCAB, max_positions=64, tiny=True)
    config.num_hidden_layers, config.intermediate_size = layers, intermediate
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, Calibration]:
    """A 4-layer LLaMA whose MLPs are most of its parameters, trained 80 steps to follow a token permutation."""
    generator = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=generator)
    model = _llama(4, 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        batch = _chains(successor, 16, 32, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 1.0, "the tiny model did not learn the permutation: FastNAS's scores would be flat"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), _calibration(successor, generator)


@pytest.mark.parametrize("fewer", [0.25, 0.5])
def test_fastnas_meets_the_parameter_target_and_the_pruned_model_runs(trained, fewer: float) -> None:
    dense, calibration = trained
    model = copy.deepcopy(dense)
    total = count_params(model)["total"]
    target = target_params(total, fewer)
    info = peers.modelopt(model, calibration, target)
    params = count_params(model)["total"]
    assert within(params, target), f"{params:,} parameters for a target of {target:,}"
    assert params <= target  # ModelOpt's bound is an upper bound, counted as budget.py counts
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert info["modelopt_widths"] == widths and max(widths) < 512
    for layer, width in zip(model.model.layers, widths, strict=True):
        mlp = layer.mlp
        assert type(mlp.gate_proj) is torch.nn.Linear  # exported: plain modules, really sliced
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (width, 64)
        assert mlp.down_proj.weight.shape == (64, width)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = calibration.example["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (*ids.shape, VOCAB) and torch.isfinite(logits).all()


def test_a_target_below_the_smallest_mlp_subnet_fails_fast_with_the_reason() -> None:
    model = _llama(2, 128)  # the MLPs are half the parameters: 50 % fewer is out of FastNAS's reach
    generator = torch.Generator().manual_seed(1)
    calibration = _calibration(torch.randperm(VOCAB, generator=generator), generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = target_params(count_params(model)["total"], 0.5)
    with pytest.raises(RuntimeError, match=r"N/A: ModelOpt FastNAS cannot reach .* searches only .*mlp"):
        peers.modelopt(model, calibration, target)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # checked before pruning


def test_bad_search_settings_are_refused(trained) -> None:
    dense, calibration = trained
    with pytest.raises(ValueError, match="choices must be >= 2"):
        peers.modelopt(copy.deepcopy(dense), calibration, 1000, choices=1)
