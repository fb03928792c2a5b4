"""Command line: ``sparsify inspect MODEL`` prints a model's channel groups; ``sparsify demo`` trains a
small CNN with STR-BN on a real data set, prunes it and reports accuracy, params, MACs and latency."""

from __future__ import annotations

import argparse
import importlib
import os
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


def _demo(args: argparse.Namespace) -> int:
    from sparsify.cli import demo

    return demo.main(args)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from sparsify.cli.demo import DATASETS, DEFAULT_EPOCHS

    demo = sub.add_parser("demo", help="train a small CNN with STR-BN on a real data set, prune it, report",
                          description="Train a small CNN with STR-BN (adapter bn_gamma, policy str), prune it "
                                      "with the optimizer, verify the pruned model's outputs, fine-tune, and "
                                      "write demo.json and widths.png to --out.")
    demo.add_argument("--data", choices=DATASETS, default="digits",
                      help="digits: scikit-learn's bundled 8×8 digits (default, no download); cifar10: the "
                           "JPEG .npz (needs --data-path); fashion-mnist: IDX files (Debian dataset-fashion-mnist)")
    demo.add_argument("--data-path", help="cifar10_jpeg.npz, or the folder of the Fashion-MNIST IDX .gz files")
    demo.add_argument("--epochs", type=int,
                      help="training epochs (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
                           + ")")
    demo.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning after prune (default 2)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (the digits split is fixed)")
    demo.add_argument("--arch", choices=("residual", "plain"), default="residual",
                      help="blocks with shortcuts (coupled channel groups) or a plain conv-BN-ReLU stack")
    demo.add_argument("--out", default="sparsify-demo-out", help="folder for demo.json and widths.png")
    demo.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    demo.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (default: 1 for digits, torch's default otherwise)")
    demo.add_argument("--quick", action="store_true", help="tiny settings (a few steps per phase), for tests")
    demo.set_defaults(run=_demo)


def main(argv: Sequence[str | os.PathLike[str]] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the channel groups of a model")
    inspect.add_argument("model", nargs="?", default="resnet18",
                         help="built-in or torchvision model name, or package.module:function")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    inspect.add_argument("--prunable-only", action="store_true", help="hide groups that cannot be pruned")
    inspect.set_defaults(run=_inspect)
    _add_demo_parser(sub)
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])  # accept os.PathLike
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
