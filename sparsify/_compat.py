"""Optional imports that need care on some installs."""

from __future__ import annotations

import sys
import types
from types import ModuleType


def import_torchvision() -> ModuleType:
    """Import torchvision, tolerating a CUDA torchvision build on a CPU-only torch.

    Such a build fails at import while registering meta kernels for its C++ ops (nms, roi_align).
    Classification models never call those ops, so we retry with that registration stubbed out.
    """
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import torchvision
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "torchvision is needed for torchvision models: pip install 'sparsify-structured[vision]'"
        ) from exc
    return torchvision
