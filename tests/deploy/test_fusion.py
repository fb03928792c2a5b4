"""deploy(fuse_activations): conv→(add)→ReLU fused into cuDNN kernels where exact; the CPU path is the original math."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import sparsify.nn.fused as fused
from sparsify.deploy import deploy
from sparsify.deploy.fusion import find_conv_activations, fuse_conv_activations
from sparsify.nn import ConvAddReLU, ConvReLU
from sparsify.testing.oracle import randomize_


def _count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(type(m) is cls for m in model.modules())


def _diff(model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - deployed(x.contiguous(memory_format=torch.channels_last))).abs().max())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_models_fuse_every_relu_and_keep_outputs(tv: ModuleType, name: str) -> None:
    model = randomize_(getattr(tv.models, name)(num_classes=10)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deployed = deploy(model, x)
    unfused = deploy(model, x, fuse_activations=False)
    unmerged = deploy(model, x, merge_residual_bias=False)
    assert _diff(model, deployed, x) <= 1e-10
    with torch.no_grad():  # the CPU path of the fused modules is the unfused math, bit for bit
        assert torch.equal(unfused(x), unmerged(x))
    fusions = deployed.sparsify_fusions
    n_relu, n_add = _count(deployed, ConvReLU), _count(deployed, ConvAddReLU)
    assert n_relu + n_add == len(fusions) and _count(unfused, ConvReLU) == 0
    if name == "mobilenet_v2":  # conv→BN→ReLU6 chains: modules replaced in place, the class kept
        assert type(deployed) is type(model) and not isinstance(deployed, fx.GraphModule)
        depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert n_relu == sum(isinstance(m, nn.ReLU6) for m in model.modules()) - len(depthwise) and n_add == 0
        refused = find_conv_activations(deploy(model, x, fuse_activations=False), x)[1]
        assert len(depthwise) == 17 and all("grouped conv" in refused[n] for n in depthwise)
        assert all(f.max_value == 6.0 for f in fusions)
        assert "features.0.0.conv.weight" in deployed.state_dict()
    else:  # residual adds: an fx GraphModule; the stem, every block conv but the last, each block's add + ReLU
        blocks = {"resnet18": 8, "resnet50": 16}[name]
        assert isinstance(deployed, fx.GraphModule) and n_add == blocks
        assert n_relu == 1 + blocks * (1 if name == "resnet18" else 2)
        assert all(f.max_value is None for f in fusions)
        # each downsample conv's bias moved into its block's fused conv (one bias kernel fewer on CUDA)
        downsample = sorted(n for n, _ in model.named_modules() if n.endswith("downsample.0"))
        assert sorted(f.bias_from for f in fusions if f.bias_from) == downsample
        assert all(deployed.get_submodule(n).bias is None for n in downsample)
        assert all(unmerged.get_submodule(n).bias is not None for n in downsample)
    assert deployed.get_submodule("conv1" if name != "mobilenet_v2" else "features.0.0").conv.weight.is_contiguous(
        memory_format=torch.channels_last)
    again = deploy(deployed, x)  # the fused modules trace as leaves: a deployed model deploys again
    assert again.sparsify_fusions == [] and _diff(model, again, x) <= 1e-10


def test_merging_a_residual_bias_leaves_the_model_as_it_was(tv: ModuleType) -> None:
    model = deploy(randomize_(tv.models.resnet18(num_classes=10)).double().eval(), torch.randn(1, 3, 32, 32).double(),
                   fuse_activations=False, channels_last=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused, fusions = fuse_conv_activations(model, x)
    assert fused is not model and any(f.bias_from for f in fusions)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert float((fused(x) - model(x)).abs().max()) <= 1e-10


class Patterns(nn.Module):
    """Fusable and unfusable conv→activation patterns side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.act = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 2, padding="same")
        self.c5 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.c6 = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.randn(8, 1, 1))
        self.c7 = nn.Conv2d(8, 8, 1)
        self.c8 = nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2)
        self.c9 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.b1(self.c1(x)))  # fused (BN folded); the ReLU module is used again below
        y = F.relu(self.c2(y))  # fused: 'same' with an odd kernel is symmetric
        y3 = self.c3(y)
        y = F.relu(y3) + y3  # c3's output is used twice: not fused
        y = self.act(self.c4(y))  # 'same' with an even kernel pads asymmetrically: not fused
        y = F.relu6(self.c5(y))  # reflect padding: not fused
        y = torch.relu(self.c6(y) + self.scale)  # a broadcast add: not fused
        t = y * 2
        u = t.add_(self.c7(y)).relu()  # adds into t in place (t is read again below): not fused
        y = F.hardtanh(self.c8(u + t), 0.0, 6.0)  # fused, capped at 6
        return self.act(self.c9(y) + y)  # fused: conv + residual + ReLU


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_only_exact_patterns_are_fused() -> None:
    model = randomize_(Patterns()).double().eval()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    fusions, refused = find_conv_activations(model, x)
    assert [f.conv for f in fusions] == ["c2", "c8", "c9"]  # c1 still has its BN: nothing to fuse yet
    assert [f.max_value for f in fusions] == [None, 6.0, None] and fusions[2].add is not None
    assert "also used" in refused["c3"] and "even kernel" in refused["c4"] and "reflect" in refused["c5"]
    assert "shape" in refused["c6"] and "c7" not in refused
    deployed = deploy(model, x, channels_last=False)
    assert isinstance(deployed, fx.GraphModule)
    assert [f.conv for f in deployed.sparsify_fusions] == ["c1", "c2", "c8", "c9"]
    assert isinstance(deployed.c9, ConvAddReLU) and isinstance(deployed.c7, nn.Conv2d)
    assert isinstance(model.c1, nn.Conv2d)  # the original is untouched
    assert _diff(model, deployed, x) <= 1e-10


def test_sequential_chain_is_fused_in_place() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1),
                          nn.ReLU6(), nn.Conv2d(8, 4, 1), nn.Hardtanh(0.0, 4.0), nn.Conv2d(4, 4, 1), nn.Hardtanh())
    randomize_(model).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    same = deploy(model, x, inplace=True)
    assert same is model and isinstance(model, nn.Sequential)
    assert [type(m).__name__ for m in model] == ["ConvReLU", "Identity", "Identity", "ConvReLU", "Identity",
                                                 "ConvReLU", "Identity", "Conv2d", "Hardtanh"]
    assert [m.max_value for m in model if isinstance(m, ConvReLU)] == [None, 6.0, 4.0]


def test_fusion_off_and_with_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    assert _count(deploy(model, x, fuse_activations=False), ConvReLU) == 0
    monkeypatch.setattr(torch, "compile", lambda m, **_: m)  # compile: inductor fuses itself, no cuDNN ops
    assert _count(deploy(model, x, compile=True), ConvReLU) == 0
    assert _count(deploy(model, x), ConvReLU) == 1
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid())
    assert fuse_conv_activations(plain, x) == (plain, [])  # nothing to fuse: the model as it was
    with pytest.raises(ValueError, match=r"plain nn\.Conv2d"):
        ConvReLU(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"))


class _FakeCudnn:
    """Reference versions of the two cuDNN ops (CPU), counting calls and checking their arguments."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.relu = self.add = 0
        self.dtype = dtype

    def _check(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: object) -> None:
        assert isinstance(padding, tuple) and all(isinstance(p, int) for p in padding)
        if self.dtype is not None:
            assert x.dtype == w.dtype == self.dtype and (b is None or b.dtype == self.dtype)

    def conv_relu(self, x, w, b, stride, padding, dilation, groups):
        self._check(x, w, b, padding)
        self.relu += 1
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_add_relu(self, x, w, z, alpha, b, stride, padding, dilation, groups):
        self._check(x, w, b, padding)
        assert z.dtype == x.dtype and alpha == 1
        self.add += 1
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, fake: _FakeCudnn) -> None:
    assert not fused._on_cudnn(torch.zeros(1))  # the real check: a CPU tensor never takes the cuDNN path
    monkeypatch.setattr(fused, "_on_cudnn", lambda x: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", fake.conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", fake.conv_add_relu)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "patterns"])
def test_fused_path_arguments(tv: ModuleType, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cuDNN ops replaced by reference versions, the fused path computes the same function."""
    if name == "patterns":
        model, x = randomize_(Patterns()).eval(), torch.randn(2, 4, 12, 12)
    else:
        model, x = randomize_(getattr(tv.models, name)(num_classes=10)).eval(), torch.randn(2, 3, 32, 32)
    deployed = deploy(model, x)
    fake = _FakeCudnn()
    _fake_cuda(monkeypatch, fake)
    with torch.no_grad():
        ref, out = model(x), deployed(x.contiguous(memory_format=torch.channels_last))
    assert (fake.relu, fake.add) == (_count(deployed, ConvReLU), _count(deployed, ConvAddReLU))
    assert fake.relu + fake.add > 0
    assert float((ref - out).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))
    deployed(x)  # gradients wanted (parameters require grad): the fused ops have no backward, not used
    assert (fake.relu, fake.add) == (_count(deployed, ConvReLU), _count(deployed, ConvAddReLU))


def test_fused_path_under_autocast_casts_and_keeps_dtype_promotion(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCudnn(torch.bfloat16)
    _fake_cuda(monkeypatch, fake)
    monkeypatch.setattr(fused, "cuda_autocast_dtype", lambda: torch.bfloat16)
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 6, 6)
    assert ConvReLU(conv)(x).dtype == torch.bfloat16 and fake.relu == 1
    add = ConvAddReLU(conv, 6.0)
    assert add(x, torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16 and fake.add == 1
    # a float32 z would promote the sum to float32 in the original: the original math runs
    assert add(x, torch.randn(2, 4, 6, 6)).dtype == torch.float32 and fake.add == 1
    assert add(x, torch.randn(4, 1, 1, dtype=torch.bfloat16)).shape == (2, 4, 6, 6) and fake.add == 1  # broadcast
    x64 = torch.randn(2, 4, 6, 6, dtype=torch.float64)  # autocast leaves float64 alone
    with pytest.raises(RuntimeError):
        ConvReLU(conv)(x64)  # as the plain conv would: float64 input, float32 weights
    assert fake.relu == 1


def test_cudnn_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> torch.Tensor:
        raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(fused, "_on_cudnn", lambda x: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse)
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    module, x = ConvReLU(conv, 6.0), torch.randn(1, 3, 5, 5) * 10
    with pytest.warns(UserWarning, match="separately"):
        out = module(x)
    assert module.failed and torch.equal(out, F.relu6(conv(x)))
    assert torch.equal(module(x), out)  # no second attempt (it would warn again)


# ---- CUDA: the real cuDNN kernels (pytest -m gpu) ----

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_cudnn_fused_kernels_on_cuda(tv: ModuleType, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused modules call cuDNN's kernels on CUDA (bf16 autocast, float32, bf16 parameters), and the
    outputs match the unfused deployment's up to rounding."""
    real_relu, real_add = torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu
    calls = {"relu": 0, "add": 0}

    def conv_relu(*args: object) -> torch.Tensor:
        calls["relu"] += 1
        return real_relu(*args)

    def conv_add_relu(*args: object) -> torch.Tensor:
        calls["add"] += 1
        return real_add(*args)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = randomize_(getattr(tv.models, name)(num_classes=10)).cuda().eval()
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    fused, plain = deploy(model, x), deploy(model, x, fuse_activations=False)
    n_relu, n_add = _count(fused, ConvReLU), _count(fused, ConvAddReLU)
    assert n_relu + n_add == len(fused.sparsify_fusions) > 0
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = plain(x), fused(x)
        assert calls == {"relu": n_relu, "add": n_add}
        assert a.dtype == b.dtype == torch.bfloat16
        assert _rel(b, ref) <= max(2 * _rel(a, ref), 2e-2)  # as close to float32 as the unfused bf16 model
        a32, b32 = plain(x), fused(x)  # float32, no TF32
        assert calls == {"relu": 2 * n_relu, "add": 2 * n_add}
        assert _rel(b32, a32) <= 1e-4
        half = deploy(model, x, dtype=torch.bfloat16)  # parameters cast, no autocast
        c = half(x.to(torch.bfloat16))
        assert calls == {"relu": 3 * n_relu, "add": 3 * n_add}
        assert c.dtype == torch.bfloat16 and _rel(c, ref) <= max(2 * _rel(a, ref), 2e-2)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the fused kernels ignore it: not used
        assert _rel(fused(x), a32) <= 1e-4 and calls == {"relu": 3 * n_relu, "add": 3 * n_add}
    assert not any(getattr(m, "failed", False) for m in [*fused.modules(), *half.modules()])
