"""Contract checks for plugins: every op rule, every adapter × policy pair, against the exactness oracle.

* :func:`check_op_rule` builds the model that :data:`RULE_MODELS` names for an op-rule kind, checks that
  its graph really uses the rule, and runs the oracle (``sparsify.testing.oracle``) on it. A registered
  rule without a model is reported by :func:`missing_rule_models`: a new rule brings a model.
* :func:`check_pair` builds a ``Sparsifier`` with an adapter and a policy on a small float64 model,
  drives the policy until structures are zero (the settings of :data:`POLICY_CASES`: schedules a few
  steps long, each step after a backward pass so that gradient-based importances have gradients),
  then prunes and compares the pruned model's outputs with the soft model's. A pair that cannot work
  together must be refused at construction with an error naming the adapter or the policy.

Adapters without an entry in :data:`ADAPTER_CASES` get their default config on the first model (of
``sparsify.testing.models`` and ``rule_models``) that they cover; policies without an entry in
:data:`POLICY_CASES` get their default config and three steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsify.adapters import AdapterConfig, make_adapter
from sparsify.config import SparsifierConfig
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.graph.rules import find_rule
from sparsify.graph.trace import as_args, trace
from sparsify.sparsifier import Sparsifier
from sparsify.testing import coverage_rule_models as coverage_models
from sparsify.testing import gather_models as gather
from sparsify.testing import models as zoo
from sparsify.testing import rule_models as extra
from sparsify.testing import sequence_models as seq
from sparsify.testing import unary_models as unary
from sparsify.testing.oracle import OracleResult, check_exactness, randomize_

Builder = Callable[..., tuple[nn.Module, Any]]
TOLERANCE = 1e-9  # float64: max |pruned - soft| ≤ TOLERANCE · (1 + max |soft|)

# ----- op rules ------------------------------------------------------------------------------------
_export = {name: extra.export_only(b) for name, b in (("pool_net", extra.pool_net),
                                                     ("heads_attention", seq.heads_attention),
                                                     ("transformer_block", zoo.transformer_block),
                                                     ("text_mlp", zoo.text_mlp),
                                                     ("channel_reduce_net", zoo.channel_reduce_net),
                                                     ("eager_attention", seq.eager_attention),
                                                     ("addmm_net", extra.addmm_net),
                                                     ("cast_net", extra.cast_net),
                                                     ("lstm_net", seq.lstm_net),
                                                     ("cell_loop", seq.cell_loop),
                                                     ("residual_cnn", zoo.residual_cnn),
                                                     ("norm_net", extra.norm_net),
                                                     ("group_norm_net", extra.group_norm_net))}

RULE_MODELS: dict[str, Builder] = {
    # fx front end
    "batch_norm": zoo.residual_cnn, "conv": zoo.residual_cnn, "elementwise_binary": zoo.residual_cnn,
    "elementwise_unary": zoo.residual_cnn, "pool": zoo.residual_cnn, "layout": zoo.flatten_net,
    "linear": zoo.mlp_block, "layer_norm": zoo.mlp_block, "cat": zoo.concat_net,
    "group_norm": zoo.grouped_conv_net, "split": zoo.shufflenet, "shape_query": zoo.shufflenet,
    "reduction": zoo.channel_reduce_net, "matmul": zoo.channel_reduce_net,
    "batch_norm_functional": zoo.functional_net, "conv_functional": zoo.functional_net,
    "linear_functional": zoo.functional_net, "embedding": zoo.text_mlp,
    "scaled_dot_product_attention": seq.heads_attention, "softmax": seq.eager_attention,
    "attention_barrier": seq.mha_block, "lstm": seq.lstm_net, "gru": seq.gru_net, "rnn": seq.rnn_net,
    "gru_cell": seq.cell_loop, "lstm_cell": seq.lstm_cell_loop, "rnn_cell": seq.rnn_cell_loop,
    "stack": seq.cell_loop, "zeros": seq.cell_loop, "pack_padded_sequence": seq.packed_lstm,
    "pad_packed_sequence": seq.packed_lstm, "prelu": extra.assorted_layers,
    "local_response_norm": extra.assorted_layers, "pad": extra.assorted_layers,
    "layer_norm_functional": extra.assorted_layers, "opaque": extra.einsum_net,
    "windowed_attention": extra.swin_stage, "patch_merging_pad": extra.swin_stage,
    "stochastic_depth": extra.stochastic_depth_net, "output_tuple": extra.stochastic_depth_net,
    "reshape_as": extra.reshape_as_net,
    # torch.export front end (ATen graphs)
    "aten_conv": _export["pool_net"], "aten_pool": _export["pool_net"], "aten_unary": _export["pool_net"],
    "aten_binary": _export["heads_attention"], "aten_linear": _export["heads_attention"],
    "layout_aten": _export["heads_attention"],
    "aten_layer_norm": _export["transformer_block"], "aten_sdpa": _export["transformer_block"],
    "aten_split": _export["transformer_block"], "aten_reduction": _export["transformer_block"],
    "aten_embedding": _export["text_mlp"], "aten_cat": _export["channel_reduce_net"],
    "aten_matmul": _export["eager_attention"], "aten_softmax": _export["eager_attention"],
    "aten_addmm": _export["addmm_net"], "aten_shape_query": _export["cast_net"],
    "rnn_aten": _export["lstm_net"], "rnn_cell_aten": _export["cell_loop"],
    "aten_batch_norm": _export["residual_cnn"], "aten_vector_norm": _export["norm_net"],
    "aten_group_norm": _export["group_norm_net"],
    "aten_unary_more": unary.more_unary_net,
    "group_norm_functional": coverage_models.subclass_group_norm_net, "aten_upsample": coverage_models.upsample_net,
    "pow": coverage_models.star_relu_net, "aten_pad": coverage_models.pad_net,
    # selection by indices and in-place ops
    "topk": gather.batched_experts, "repeat_interleave": gather.batched_experts,
    "aten_index_tensor": extra.export_only(gather.batched_experts), "index_select": gather.index_select_tokens,
    "binary_inplace": gather.in_place, "aten_hardtanh": gather.in_place, "unary_inplace": gather.sigmoid_in_place,
}


def missing_rule_models(kinds: Iterable[str]) -> list[str]:
    """The op-rule kinds among ``kinds`` that :data:`RULE_MODELS` has no model for."""
    return sorted(k for k in kinds if k not in RULE_MODELS)


def rules_used(model: nn.Module, example_inputs: Any) -> set[str]:
    """Kinds of the op rules that the traced graph of ``model`` dispatches to."""
    gm = trace(model, example_inputs).graph_module
    return {rule.kind for node in gm.graph.nodes if (rule := find_rule(node, gm)) is not None}


def check_op_rule(kind: str, seed: int = 0) -> OracleResult:
    """The oracle on ``RULE_MODELS[kind]`` in float64; raises AssertionError unless the model uses the
    rule, some group is pruned and the pruned model computes what the soft one did."""
    if kind not in RULE_MODELS:
        raise AssertionError(f"op rule {kind!r} has no contract model: add one to sparsify.testing.contracts."
                             "RULE_MODELS (a small model whose graph uses the rule, see testing/rule_models.py)")
    builder = RULE_MODELS[kind]
    model, inputs = builder(torch.float64)
    used = rules_used(model, inputs)
    if kind not in used:
        raise AssertionError(f"{builder.__name__} does not use op rule {kind!r} (it uses {sorted(used)})")
    randomize_(model, seed)
    result = check_exactness(model, inputs, 0.5, seed)
    if result.groups_pruned == 0:
        raise AssertionError(f"{builder.__name__}: the oracle pruned no group, so it checked nothing for {kind!r}")
    if result.max_abs_diff > TOLERANCE * (1 + result.output_scale):
        raise AssertionError(f"{builder.__name__} ({kind!r}): pruning changed the outputs by "
                             f"{result.max_abs_diff:.3g} (scale {result.output_scale:.3g})")
    return result


# ----- adapters × policies -------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterCase:
    """Models an adapter covers (the first it covers is used) and its config's non-default fields."""

    models: Sequence[Builder]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyCase:
    """A config that zeroes structures within ``steps`` steps (or at ``finalize``)."""

    config: dict[str, Any] = field(default_factory=dict)
    steps: int = 3


ALL_MODELS: tuple[Builder, ...] = (*zoo.MODELS.values(), *extra.MODELS.values())
ADAPTER_CASES: dict[str, AdapterCase] = {
    "bn_gamma": AdapterCase([zoo.residual_cnn]),
    "filter_norm": AdapterCase([zoo.residual_cnn]),
    "activation": AdapterCase([zoo.residual_cnn]),
    "heads": AdapterCase([seq.heads_attention]),
    "low_rank": AdapterCase([extra.factor_pair]),
    "rnn_units": AdapterCase([seq.lstm_net]),
    # taylor: the most demanding criterion (reads the gradients of the backward passes)
    "torch_pruning": AdapterCase([zoo.residual_cnn, zoo.mlp_block], {"criterion": "taylor"}),
    "taylor": AdapterCase([zoo.residual_cnn]),  # reads the gradients of covered_model's backward pass
    "fluctuation": AdapterCase([zoo.mlp_block]),  # Linear consumers (FLAP)
}
POLICY_CASES: dict[str, PolicyCase] = {
    "gmp": PolicyCase({"sparsity": 0.5, "start_step": 0, "end_step": 2, "update_every": 1}, steps=2),
    # finalize() brings the soft model to the target; exp thresholds can pass 1 (RNN-unit and head norms do)
    "str": PolicyCase({"target": 0.4, "target_end_step": 2, "threshold_fn": "exp"}, steps=2),
    "slimming": PolicyCase({"sparsity": 0.5}, steps=1),  # finalize() sets the global threshold
}


def adapter_case(kind: str) -> AdapterCase:
    return ADAPTER_CASES.get(kind, AdapterCase(ALL_MODELS))


def policy_case(kind: str) -> PolicyCase:
    return POLICY_CASES.get(kind, PolicyCase())


@dataclass
class PairResult:
    """What :func:`check_pair` saw: ``"exact"`` (pruned, outputs kept) or ``"refused"`` (with the error)."""

    adapter: str
    policy: str
    outcome: str
    model: str = ""
    error: str = ""
    max_abs_diff: float = 0.0
    zeros: int = 0


def _outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    args, kwargs = as_args(inputs)
    with torch.no_grad():
        flat, _ = torch.utils._pytree.tree_flatten(model(*args, **kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _backward(model: nn.Module, inputs: Any) -> None:
    """One backward pass of the outputs' sum: gradients for importances that need them (no weight update)."""
    model.zero_grad(set_to_none=True)
    args, kwargs = as_args(inputs)
    flat, _ = torch.utils._pytree.tree_flatten(model(*args, **kwargs))
    sum(t.sum() for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()).backward()


def covered_model(adapter: AdapterConfig, seed: int = 0) -> tuple[str, nn.Module, Any]:
    """The first model of the adapter's case that it covers (float64, randomised, eval mode, with gradients)."""
    for builder in adapter_case(adapter.kind).models:
        model, inputs = builder(torch.float64)
        randomize_(model, seed)
        model.eval()
        _backward(model, inputs)
        if make_adapter(adapter).vectors(build_channel_graph(model, inputs)):
            return builder.__name__, model, inputs
    raise AssertionError(f"adapter {adapter.kind!r} covers no group of its contract models: add an AdapterCase "
                         "with a model it covers to sparsify.testing.contracts.ADAPTER_CASES")


def _refusal(adapter_kind: str, policy_kind: str, model: str, exc: Exception) -> PairResult:
    message = str(exc)
    if adapter_kind not in message and policy_kind not in message:
        raise AssertionError(f"{adapter_kind} × {policy_kind} was refused with an error that names neither: "
                             f"{type(exc).__name__}: {message}") from exc
    return PairResult(adapter_kind, policy_kind, "refused", model, f"{type(exc).__name__}: {message}")


def check_pair(adapter_kind: str, policy_kind: str, seed: int = 0) -> PairResult:
    """Sparsify, drive, prune and compare (see the module docstring); raises AssertionError on a
    contract breach, returns the outcome otherwise."""
    pcase = policy_case(policy_kind)
    try:
        config = SparsifierConfig(adapter={"kind": adapter_kind, **adapter_case(adapter_kind).config},
                                  policy={"kind": policy_kind, **pcase.config})
    except (SparsifyError, ValueError, TypeError) as exc:
        return _refusal(adapter_kind, policy_kind, "", exc)
    name, model, inputs = covered_model(config.adapter, seed)
    try:
        sp = Sparsifier(model, inputs, config=config)
    except (SparsifyError, ValueError, TypeError) as exc:
        return _refusal(adapter_kind, policy_kind, name, exc)
    for _ in range(pcase.steps):
        _backward(model, inputs)
        sp.step()
    model.zero_grad(set_to_none=True)
    sp.policy.finalize()  # what prune() does first; the soft model it prunes from
    zeros = sum(len(z) for z in sp.zero_structures().values())
    if zeros == 0:
        raise AssertionError(f"{adapter_kind} × {policy_kind} on {name}: no structure is zero after {pcase.steps} "
                             "steps; give the policy settings that zero some in contracts.POLICY_CASES")
    soft = _outputs(model, inputs)
    result = sp.prune()
    pruned = _outputs(model, inputs)
    diff = max(float((a - b).abs().max()) for a, b in zip(soft, pruned, strict=True))
    scale = max(float(a.abs().max()) for a in soft)
    if diff > TOLERANCE * (1 + scale):
        raise AssertionError(f"{adapter_kind} × {policy_kind} on {name}: pruning changed the outputs by {diff:.3g}")
    if result.params_after >= result.params_before:
        raise AssertionError(f"{adapter_kind} × {policy_kind} on {name}: {zeros} zero structures but prune() "
                             f"removed no parameter ({result.params_before} → {result.params_after})")
    return PairResult(adapter_kind, policy_kind, "exact", name, max_abs_diff=diff, zeros=zeros)
