"""HF decoders traced from two layers, the rest replicated (sparsify.hf.repeated): the channel graph equals
the full torch.export's, node names and group reasons included, and the oracle passes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import transformers

from sparsify import build_channel_graph
from sparsify.graph import repeated_layers as rl
from sparsify.graph import trace as trace_module
from sparsify.hf.repeated import decoder_layers_path
from sparsify.testing.oracle import check_exactness

CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def _model(family: str, layers: int) -> tuple[torch.nn.Module, dict]:
    config = getattr(transformers, CONFIGS[family])(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    return model, {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))}


@pytest.fixture
def exported_layers(monkeypatch):
    seen: list[int] = []
    real = trace_module._export

    def spy(model, args, kwargs):
        seen.append(len(model.model.layers))
        return real(model, args, kwargs)

    monkeypatch.setattr(trace_module, "_export", spy)
    return seen


@pytest.mark.parametrize("layers", [2, 3, 4])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_same_channel_graph_as_the_full_export(family, layers, exported_layers):
    model, x = _model(family, layers)
    fast = build_channel_graph(model, x)
    assert exported_layers == [min(layers, 2)]
    rl.REPEATED_LAYERS.remove(decoder_layers_path)
    try:
        full = build_channel_graph(model, x)
    finally:
        rl.register_repeated_layers(decoder_layers_path)
    assert [n.name for n in fast.traced.graph.nodes] == [n.name for n in full.traced.graph.nodes]
    assert fast.signature_rows() == full.signature_rows()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_oracle_on_the_replicated_graph(family, exported_layers):
    model, x = _model(family, 4)
    result = check_exactness(model, x)
    assert exported_layers == [2]
    assert result.groups_pruned > 0 and result.max_abs_diff <= 1e-9


def test_mixed_layer_types_are_traced_whole():
    model, _ = _model("qwen2", 4)
    assert decoder_layers_path(model) == "model.layers"
    model.config.layer_types = ["sliding_attention", "full_attention"] * 2
    assert decoder_layers_path(model) is None
    assert decoder_layers_path(torch.nn.Linear(2, 2)) is None
