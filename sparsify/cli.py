"""Command line: ``sparsify inspect MODEL`` prints a model's channel groups."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch
from torch import nn


def load_model(spec: str) -> tuple[nn.Module, torch.Tensor]:
    """Build a model from ``spec``: a built-in test model, a torchvision model name, or
    ``package.module:function`` returning ``(model, example_input)``."""
    if ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        result = getattr(importlib.import_module(module_name), fn_name)()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise SystemExit(f"{spec} must return (model, example_input)")
        return result
    from sparsify.testing import models as builtin

    builtins = getattr(builtin, "MODELS", {})
    if spec in builtins:
        return builtins[spec]()
    from sparsify._compat import import_torchvision

    tv = import_torchvision()
    if spec not in tv.models.list_models(module=tv.models):
        raise SystemExit(
            f"unknown model {spec!r}: not a built-in ({', '.join(sorted(builtins))}) nor a "
            "torchvision classification model; or pass package.module:function")
    size = 299 if spec == "inception_v3" else 224
    return tv.models.get_model(spec).eval(), torch.randn(1, 3, size, size)


def _inspect(args: argparse.Namespace) -> int:
    from sparsify.graph.channel_graph import build_channel_graph
    from sparsify.graph.report import print_groups

    model, example = load_model(args.model)
    if args.input_shape:
        example = torch.randn(*[int(s) for s in args.input_shape.split(",")])
    cg = build_channel_graph(model, example)
    print_groups(cg, show_all=not args.prunable_only)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the channel groups of a model")
    inspect.add_argument("model", nargs="?", default="resnet18",
                         help="built-in or torchvision model name, or package.module:function")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    inspect.add_argument("--prunable-only", action="store_true", help="hide groups that cannot be pruned")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
