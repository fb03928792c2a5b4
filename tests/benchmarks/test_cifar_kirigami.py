"""The torch-kirigami peer arm of the CIFAR harness (skipped where the package is not installed)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cifar_lib import kirigami_arm
from benchmarks.cifar_lib.arm_base import TARGET_TOLERANCE, macs_of, target_met
from benchmarks.cifar_lib.arms import ARMS
from benchmarks.cifar_lib.models import build


@pytest.mark.slow  # kirigami scores ~2,100 candidates of ResNet-56 on the CPU: minutes
def test_kirigami_prunes_resnet56_to_the_macs_target() -> None:
    pytest.importorskip("torch_kirigami")
    torch.manual_seed(0)
    model = build("resnet56").eval()
    x = torch.randn(2, 3, 32, 32)
    before = macs_of(model, x)
    arm = ARMS["kirigami"](2.13, 10, 1, 0)
    assert arm.prunes and arm.prune_at_start  # one-shot at the start of the phase, as l1_oneshot
    arm.setup(model, x)
    arm.prune(model, x)
    reduction = before / macs_of(model, x)
    assert target_met(reduction, 2.13), (reduction, TARGET_TOLERANCE)
    assert arm.info["kirigami_selected"] > 0 and arm.info["kirigami_version"]
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.conv1.out_channels <= 16 and model.fc.out_features == 10  # the classifier keeps its outputs


def test_kirigami_arm_fails_fast_without_the_package(monkeypatch) -> None:
    """Absent package: the arm stops in setup (before any training) and says what to install."""
    import builtins

    real = builtins.__import__

    def no_kirigami(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("torch_kirigami"):
            raise ImportError("No module named 'torch_kirigami'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kirigami)
    arm = ARMS["kirigami"](2.13, 10, 1, 0)
    with pytest.raises(SystemExit, match=f"pip install torch-kirigami=={kirigami_arm.KIRIGAMI_VERSION}"):
        arm.setup(build("resnet20"), torch.randn(2, 3, 32, 32))
