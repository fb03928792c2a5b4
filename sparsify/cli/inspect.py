"""``sparsify inspect MODEL``: build a model from a name and print its channel groups.

``MODEL`` is one of: a built-in test model (``sparsify.testing.models``); a torchvision classification model
(``resnet18``); ``hf:<model_type>``, a small randomly initialised Hugging Face model of that type (``hf:llama``,
``hf:gpt2``, ``hf:qwen2``: 2 layers, hidden size 64) built with ``transformers.AutoConfig.for_model``; or
``package.module:function`` returning ``(model, example_input)`` for any other model, a pretrained Hugging Face
checkpoint included.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from torch import nn

__all__ = ["HF_TINY_CONFIG", "load_hf_model", "load_model", "run"]

HF_TINY_CONFIG: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                                  "use_cache": False}
_HF_SEQUENCE = 8


def load_hf_model(model_type: str, input_shape: Sequence[int] = (1, _HF_SEQUENCE)) -> tuple[nn.Module, Any]:
    """A small randomly initialised Hugging Face model of ``model_type`` (its causal-LM class where it has one,
    else its base model), in eval mode, and ``{"input_ids": ...}`` of ``input_shape``."""
    from sparsify._compat import import_torchvision

    try:
        import_torchvision()  # transformers imports torchvision when present: make a CUDA build load on CPU torch
    except ModuleNotFoundError:
        pass
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise SystemExit("hf:<model_type> needs transformers: pip install 'sparsify-structured[hf]'") from exc
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a tiny vocabulary makes some configs warn about token ids
    try:
        try:
            config = transformers.AutoConfig.for_model(model_type, **HF_TINY_CONFIG)
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"hf:{model_type}: {model_type!r} is not a transformers model type (e.g. llama, gpt2, "
                             "qwen2, bert); for a pretrained checkpoint pass package.module:function") from exc
        torch.manual_seed(0)
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # no causal-LM head for this type
            model = transformers.AutoModel.from_config(config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), {"input_ids": torch.randint(0, config.vocab_size, tuple(input_shape))}


def _call_builder(spec: str) -> tuple[nn.Module, Any]:
    """``package.module:function`` → ``function()``, which must return ``(model, example_input)``."""
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"{spec}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH (run from the folder "
                         "that holds it)?") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SystemExit(f"{spec}: {module_name} has no function {fn_name!r}"
                         + ("" if fn is None else f" (it is a {type(fn).__name__})")
                         + "; give package.module:function returning (model, example_input)")
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise SystemExit(f"{spec} must return (model, example_input), got {type(result).__name__}")
    return result


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Build a model from ``spec`` (see the module docstring); returns ``(model, example_input)``."""
    if spec.startswith("hf:"):
        return load_hf_model(spec[3:])
    if ":" in spec:
        return _call_builder(spec)
    from sparsify.testing import models as builtin

    builtins = getattr(builtin, "MODELS", {})
    if spec in builtins:
        return builtins[spec]()
    from sparsify._compat import import_torchvision

    tv = import_torchvision()
    if spec not in tv.models.list_models(module=tv.models):
        raise SystemExit(
            f"unknown model {spec!r}: not a built-in ({', '.join(sorted(builtins))}) nor a torchvision "
            "classification model; pass hf:<model_type> for a small Hugging Face model or package.module:function")
    size = 299 if spec == "inception_v3" else 224
    return tv.models.get_model(spec).eval(), torch.randn(1, 3, size, size)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsify inspect`` (``args`` from the CLI parser)."""
    from sparsify.graph.channel_graph import build_channel_graph
    from sparsify.graph.report import print_groups

    shape = args.input_shape  # a list of ints (the parser checked it) or None
    with Console(stderr=True).status(f"building {args.model} and tracing its channel graph"):  # silent off a tty
        if args.model.startswith("hf:"):
            model, example = load_hf_model(args.model[3:], *([shape] if shape else []))
        else:
            model, example = load_model(args.model)
            if shape:
                example = torch.randn(*shape)
        cg = build_channel_graph(model, example)
    print_groups(cg, show_all=not args.prunable_only)
    return 0
