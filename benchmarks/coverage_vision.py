"""timm and torchvision builders for the coverage zoo (``benchmarks.coverage``).

* timm: one family per timm module (``timm.list_modules()``); its smallest variant by parameter count,
  counted on the meta device so that no weights are allocated; ``pretrained=False``; a 64×64 input where
  the model takes it (else ``img_size=64``, else its default input size).
* torchvision (``weights=None`` everywhere): classification, one family per model module (its smallest
  variant); segmentation (the whole model); detection: the part before the data-dependent post-processing,
  i.e. backbone + FPN/extra layers + the dense head (RPN head for the R-CNNs), without the input transform,
  anchors, box decoding and NMS; video; optical flow (RAFT with 2 flow updates).

Every builder returns ``(model in float64 eval mode, example inputs, modules Torch-Pruning must ignore)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.coverage_models import IMAGE, Built, NotBuilt, _first_line
from sparsify._compat import import_torchvision

MAX_PARAMS = 300_000_000  #: timm families whose smallest variant is larger are 'not built'


# ---------------------------------------------------------------------------------------------- timm
def timm_families() -> list[str]:
    import_torchvision()
    import timm

    return sorted(timm.list_modules())


def timm_smallest(family: str) -> tuple[str, int]:
    """(name, parameters) of the family's smallest variant, counted on the meta device."""
    import timm

    sizes = []
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"):
                sizes.append((sum(p.numel() for p in timm.create_model(name).parameters()), name))
        except Exception:
            continue
    if not sizes:
        raise NotBuilt(f"no variant of timm module {family!r} builds on the meta device")
    params, name = min(sizes)
    return name, params


def build_timm(family: str) -> tuple[str, Built]:
    import timm

    name, params = timm_smallest(family)
    if params > MAX_PARAMS:
        raise NotBuilt(f"the smallest variant {name} has {params / 1e6:.0f}M parameters, beyond the zoo's "
                       f"{MAX_PARAMS / 1e6:.0f}M cap (float64 on a small CPU machine)")
    x = torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64)
    for kwargs in ({}, {"img_size": IMAGE}):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
            with torch.no_grad():
                model(x)
            return name, (model, x, _timm_head(model))
        except Exception:
            continue
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).double().eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(1, *size, dtype=torch.float64)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise NotBuilt(f"{name} does not run on its default input {size}: {_first_line(exc)}") from exc
    return name, (model, x, _timm_head(model))


def _timm_head(model: nn.Module) -> list[nn.Module]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [head] if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else []


# ---------------------------------------------------------------------------------------------- torchvision
class DenseDetector(nn.Module):
    """A detector up to its dense outputs: backbone (+ FPN / extra layers), then the head on every level."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(list(self.backbone(x).values()))


class FewFlowUpdates(nn.Module):
    """RAFT with a fixed, small number of recurrent flow updates (its default is 12)."""

    def __init__(self, raft: nn.Module, updates: int = 2) -> None:
        super().__init__()
        self.raft, self.updates = raft, updates

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> list[torch.Tensor]:
        return self.raft(image1, image2, num_flow_updates=self.updates)


def _tv_model(name: str, **kwargs: Any) -> nn.Module:
    tv = import_torchvision()
    torch.manual_seed(0)
    return tv.models.get_model(name, weights=None, **kwargs).double().eval()


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _classifier(module: str) -> Callable[[], Built]:
    def build() -> Built:
        tv = import_torchvision()
        names = [n for n in tv.models.list_models(module=tv.models)
                 if tv.models.get_model_builder(n).__module__ == f"torchvision.models.{module}"]
        name = min(names, key=_tv_params)
        kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": True} if module in ("googlenet",
                                                                                       "inception") else {}
        if module == "vision_transformer":  # a fixed image size: the tiny one is a constructor argument
            kwargs = {"image_size": IMAGE}
        size = {"inception": 299, "maxvit": 224}.get(module, IMAGE)  # maxvit's window partitions need 224
        model = _tv_model(name, **kwargs)
        return model, _x(1, 3, size, size), [_tv_head(model)]

    return build


def _tv_params(name: str) -> int:
    """The parameter count torchvision's weights metadata states (regnet does not build on the meta device)."""
    tv = import_torchvision()
    return min(w.meta["num_params"] for w in tv.models.get_model_weights(name))


def _tv_head(model: nn.Module) -> nn.Module:
    """The last Linear / 1×1-conv classifier layer (Torch-Pruning must leave the class count alone)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return last[-1]


def _detector(name: str, size: int = 128) -> Callable[[], Built]:
    def build() -> Built:
        model = _tv_model(name, weights_backbone=None)
        head = model.rpn.head if hasattr(model, "rpn") else model.head
        return DenseDetector(model.backbone, head).double().eval(), _x(1, 3, size, size), []

    return build


def _whole(name: str, shape: tuple[int, ...], **kwargs: Any) -> Callable[[], Built]:
    def build() -> Built:
        return _tv_model(name, **kwargs), _x(*shape), []

    return build


def _raft() -> Built:
    model = FewFlowUpdates(_tv_model("raft_small"))
    return model, (_x(1, 3, 128, 128, seed=0), _x(1, 3, 128, 128, seed=1)), []


_CLASSIFICATION = ("alexnet", "convnext", "densenet", "efficientnet", "googlenet", "inception", "maxvit", "mnasnet",
                   "mobilenetv2", "mobilenetv3", "regnet", "resnet", "shufflenetv2", "squeezenet", "swin_transformer",
                   "vgg", "vision_transformer")
_DETECTION = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
              "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
              "keypointrcnn_resnet50_fpn")
#: what ran of each non-classification family (the whole model unless said here)
PART = {f"detection.{n}": "backbone + neck + dense head (RPN head for R-CNN), no post-processing" for n in _DETECTION}
PART["optical_flow.raft_small"] = "the whole model, 2 flow updates"

TORCHVISION: dict[str, Callable[[], Built]] = {
    **{f"classification.{m}": _classifier(m) for m in _CLASSIFICATION},
    **{f"detection.{n}": _detector(n, 300 if n == "ssd300_vgg16" else 128) for n in _DETECTION},
    **{f"segmentation.{n}": _whole(n, (1, 3, IMAGE, IMAGE), weights_backbone=None)
       for n in ("deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large")},
    **{f"video.{n}": _whole(n, (1, 3, 4, 32, 32)) for n in ("r3d_18", "mc3_18", "r2plus1d_18")},
    "video.s3d": _whole("s3d", (1, 3, 8, 64, 64)),
    "video.swin3d_t": _whole("swin3d_t", (1, 3, 4, 64, 64)),
    "video.mvit_v1_b": _whole("mvit_v1_b", (1, 3, 16, 224, 224)),
    "optical_flow.raft_small": _raft,
}


def build_torchvision(family: str) -> tuple[str, Built]:
    if family not in TORCHVISION:
        raise KeyError(f"unknown torchvision family {family!r}; known: {sorted(TORCHVISION)}")
    try:
        built = TORCHVISION[family]()
        args = built[1] if isinstance(built[1], tuple) else (built[1],)
        with torch.no_grad():
            built[0](*args)
    except Exception as exc:
        raise NotBuilt(f"{family} does not build or run: {type(exc).__name__}: {_first_line(exc)}") from exc
    return family.rpartition(".")[2], built
