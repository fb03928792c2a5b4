"""save/load: a pruned model round-trips bit-exactly through its plan and safetensors weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import sparsify
from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.io import LoadError, PruneRecord, load_record
from sparsify.testing.models import TiedLM
from sparsify.testing.oracle import random_plan, soft_zero_


def _outputs(model: nn.Module, x: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)


def _round_trip(model: nn.Module, build_fn: Callable[[], nn.Module], reports: Any, x: Any, path: Path) -> nn.Module:
    sparsify.save(model, path, reports, x)
    loaded = sparsify.load(build_fn, path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(_outputs(model, x), _outputs(loaded, x))
    return loaded


class MLP(nn.Module):
    """Bias-free linears around a BatchNorm: folding a kept β into ``fc2`` creates its bias."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(y))).mean((2, 3)))


def _pruned_mlp() -> tuple[nn.Module, Any, torch.Tensor]:
    model, x = MLP().eval(), torch.randn(5, 4)
    with torch.no_grad():
        model.bn.weight[[1, 5]] = 0.0  # soft-zeroed γ, β kept: relu(β) is a constant that reaches fc2
        model.bn.bias[[1, 5]] = torch.tensor([0.3, 0.8])
        model.bn.running_mean.uniform_(-1, 1)
    cg = build_channel_graph(model, x)
    report = prune_channels(cg, {cg.group("fc1").name: [1, 5]})
    return model, report, x


def test_resnet18_round_trip(tv: ModuleType, tmp_path: Path) -> None:
    model, x = tv.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    cg = build_channel_graph(model, x)
    plan = random_plan(cg, 0.5)
    soft_zero_(model, cg.groups, plan)
    report = prune_channels(cg, plan)
    assert report.plan and not report.created_biases
    _round_trip(model, lambda: tv.models.resnet18(num_classes=10), [report], x, tmp_path)
    saved = PruneRecord.model_validate_json((tmp_path / "plan.json").read_text())
    assert saved.steps[0].removed == report.plan and saved.example_inputs.tensors[0].shape == [1, 3, 64, 64]


def test_bias_created_by_folding_round_trips(tmp_path: Path) -> None:
    model, report, x = _pruned_mlp()
    assert report.created_biases == {"fc2.bias": (3,)} and report.plan == {"fc1": [1, 5]}
    loaded = _round_trip(model, MLP, report, x, tmp_path)
    assert loaded.fc2.bias is not None and loaded.fc1.out_features == 6
    record = load_record(tmp_path)
    assert isinstance(record, PruneRecord) and record.steps[0].created_biases == {"fc2.bias": [3]}
    with pytest.raises(LoadError, match="not found"):
        load_record(tmp_path / "missing")


def test_sparsifier_then_second_prune_round_trips(tmp_path: Path) -> None:
    model, x = SmallCNN(), torch.randn(2, 3, 8, 8)
    sp = Sparsifier(model, x, "filter_norm", GMPConfig(sparsity=0.5, start_step=0, end_step=1, update_every=1))
    sp.step()
    result = sp.prune()
    cg = build_channel_graph(model, x)  # a fresh graph of the pruned model
    plan = random_plan(cg, 0.25)
    soft_zero_(model, cg.groups, plan)
    second = prune_channels(cg, plan)
    assert result.surgery.plan and second.plan
    sparsify.save(model, tmp_path, [result, second], x)
    assert len(json.loads((tmp_path / "plan.json").read_text())["steps"]) == 2
    _round_trip(model, SmallCNN, [result, second], x, tmp_path)


def test_tied_weights_and_token_ids_round_trip(tmp_path: Path) -> None:
    model, ids = TiedLM().eval(), torch.randint(0, 11, (2, 5))
    cg = build_channel_graph(model, {"ids": ids})
    plan = random_plan(cg, 0.5)
    soft_zero_(model, cg.groups, plan)
    report = prune_channels(cg, plan)
    assert report.plan
    loaded = _round_trip(model, TiedLM, report, {"ids": ids}, tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    saved = PruneRecord.model_validate_json((tmp_path / "plan.json").read_text())
    assert saved.aliases == {"head.weight": "embed.weight"}
    assert saved.example_inputs.names == ["ids"] and saved.example_inputs.tensors[0].dtype == "int64"


def test_load_errors(tmp_path: Path) -> None:
    model, report, x = _pruned_mlp()
    sparsify.save(model, tmp_path, report, x)
    with pytest.raises(LoadError, match=r"width 10 .* had width 8.*build_fn"):
        sparsify.load(lambda: MLP(hidden=10), tmp_path)
    with pytest.raises(LoadError, match=r"'fc1' .* not in the model"):
        sparsify.load(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path)
    with pytest.raises(SparsifyError, match="not found"):
        sparsify.load(MLP, tmp_path / "nowhere")
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["fc2.weight"] = torch.zeros(3, 7)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=r"'fc2\.weight' .* does not match the sha256"):
        sparsify.load(MLP, tmp_path)
    record = json.loads((tmp_path / "plan.json").read_text())
    del record["checksums"]  # as written before checksums existed: the shape check still speaks
    (tmp_path / "plan.json").write_text(json.dumps(record))
    with pytest.raises(LoadError, match=r"'fc2\.weight' is \(3, 7\)"):
        sparsify.load(MLP, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"model\.safetensors not found"):
        sparsify.load(MLP, tmp_path)


ZOO = ["resnet18", "densenet121", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf", "efficientnet_b0",
       "squeezenet1_1", "googlenet", "convnext_tiny", "vit_b_16", "swin_t"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_round_trip(tv: ModuleType, name: str, tmp_path: Path) -> None:
    """Pruned torchvision models (inexact groups included) reload bit-exactly from their plan."""
    size = 224 if name.startswith(("vit", "swin")) else 64

    def build() -> nn.Module:
        torch.manual_seed(0)
        return tv.models.get_model(name).eval()

    model, x = build(), torch.randn(1, 3, size, size)
    cg = build_channel_graph(model, x)
    report = prune_channels(cg, random_plan(cg, 0.5, exact_only=False), allow_inexact=True)
    assert report.params_after < report.params_before
    with torch.no_grad():
        for p in model.parameters():  # weights unlike the build's, so loading must really happen
            p.add_(0.01)
    _round_trip(model, build, report, x, tmp_path / name)


def test_hugging_face_llama_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, use_cache=False)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    model, ids = build(), {"input_ids": torch.randint(0, 100, (1, 8))}
    cg = build_channel_graph(model, ids)
    report = prune_channels(cg, random_plan(cg, 0.5, exact_only=False), allow_inexact=True)
    assert model.model.layers[0].mlp.gate_proj.out_features == 64
    a = model(**ids).logits
    sparsify.save(model, tmp_path / "llama", report, ids)
    loaded = sparsify.load(build, tmp_path / "llama")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(loaded(**ids).logits, a)
