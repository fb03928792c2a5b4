"""Command line of sparsify.

``sparsify inspect MODEL`` prints a model's channel groups: their widths, members and whether (or why not)
they can be pruned. MODEL is a built-in test model, a torchvision model name (``resnet18``),
``hf:<model_type>`` for a small random Hugging Face model of that type (``hf:llama``, ``hf:gpt2``; needs
transformers), or ``package.module:function`` returning ``(model, example_input)`` (any other model, e.g. a
pretrained Hugging Face checkpoint).

``sparsify demo`` trains a small CNN with STR-BN on a real data set, prunes it and reports accuracy,
params, MACs and latency.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

__all__ = ["main"]


def _count(minimum: int) -> type[int]:
    """An argparse ``type``: an int ≥ ``minimum`` (a bad value is a usage error, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value
    parse.__name__ = f"integer ≥ {minimum}"
    return parse  # type: ignore[return-value]


def _shape(text: str) -> list[int]:
    """An argparse ``type``: comma-separated positive sizes, e.g. ``1,3,224,224``."""
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give comma-separated positive sizes, e.g. "
                                         "1,3,224,224")
    return shape


def _inspect(args: argparse.Namespace) -> int:
    from sparsify.cli.inspect import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from sparsify.cli.demo import main as demo_main

    return demo_main(args)


def _add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="print the channel groups of a model",
                             description="Print the channel groups of a model: width, members, and whether (or "
                                         "why not) each can be pruned.")
    inspect.add_argument("model", help="a built-in test model or torchvision model name (resnet18); hf:<model_type> "
                                       "for a small random Hugging Face model (hf:llama, hf:gpt2; needs "
                                       "transformers); or package.module:function returning (model, example_input)")
    inspect.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (hf: models: "
                                                            "token ids, "
                                               "e.g. 1,16)")
    inspect.add_argument("--prunable-only", action="store_true", help="hide groups that cannot be pruned")
    inspect.set_defaults(run=_inspect)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from sparsify.cli.demo.config import DATASETS, DEFAULT_EPOCHS

    demo = sub.add_parser("demo", help="train a small CNN with STR-BN on a real data set, prune it, report",
                          description="Train a small CNN with STR-BN (adapter bn_gamma, policy str), prune it "
                                      "with the optimizer, verify the pruned model's outputs, fine-tune, and "
                                      "write demo.json and widths.png to --out.")
    demo.add_argument("--data", choices=DATASETS, default="digits",
                      help="digits: scikit-learn's bundled 8×8 digits (default, no download); cifar10: the "
                           "JPEG .npz (needs --data-path); fashion-mnist: the IDX files (needs --data-path)")
    demo.add_argument("--data-path", help="cifar10_jpeg.npz, or the folder of the Fashion-MNIST IDX (.gz) files")
    demo.add_argument("--epochs", type=_count(1),
                      help="training epochs (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
                           + ")")
    demo.add_argument("--finetune-epochs", type=_count(0), help="epochs of fine-tuning after prune (default 2)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (the digits split is fixed)")
    demo.add_argument("--arch", choices=("residual", "plain"), default="residual",
                      help="blocks with shortcuts (coupled channel groups) or a plain conv-BN-ReLU stack")
    demo.add_argument("--out", default="sparsify-demo-out", help="folder for demo.json and widths.png")
    demo.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    demo.add_argument("--threads", type=_count(0), default=0,
                      help="torch CPU threads (default: 1 for digits, torch's default otherwise)")
    demo.add_argument("--quick", action="store_true", help="tiny settings (a few steps per phase), for tests")
    demo.set_defaults(run=_demo)


def parser() -> argparse.ArgumentParser:
    """The ``sparsify`` argument parser (subcommands ``inspect`` and ``demo``)."""
    p = argparse.ArgumentParser(prog="sparsify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_inspect_parser(sub)
    _add_demo_parser(sub)
    return p


def main(argv: Sequence[str | os.PathLike[str]] | None = None) -> int:
    """Run ``sparsify`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from sparsify.errors import SparsifyError

    args = parser().parse_args(None if argv is None else [str(a) for a in argv])  # accept os.PathLike
    try:
        return args.run(args)
    except SparsifyError as exc:  # a clear message already: no traceback
        raise SystemExit(f"sparsify {args.command}: {exc}") from exc
