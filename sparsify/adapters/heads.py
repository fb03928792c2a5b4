"""``heads``: one importance vector per attention layer, one entry per head (or KV group).

Covers the groups whose structures are attention heads (``ChannelGroup.kind == "head"``) or
grouped-query KV groups (``"kv_group"``: a key/value head with the query heads that read it). The raw
importance of a head is the L2 norm of its weights: its q, k and v rows (head_dim rows each, all of
a KV group's) together with the output projection's columns that read it (``source="qkvo"``), or
only those output columns (``source="o"``: what the head writes into the residual stream).

A policy's transform acts as a per-head factor effective/raw on the tensors that produce the head
(q, k, v rows and their biases), as in ``filter_norm``: a zero removes the head exactly (its output
is then zero, so the output projection's columns see nothing), and ``prune()`` removes it physically.
With ``head_dim=True`` it also covers head_dim slot groups (``kind="head_dim"``: slot j of every head,
see ``sparsify/graph/rules/head_dim.py``), with the same norm and transform.

``nn.MultiheadAttention`` is a leaf that ties its inner width to ``embed_dim`` (so its heads cannot
shrink); :func:`sparsify.nn.explicit_multihead_attention_` swaps it for an equivalent explicit module first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sparsify.adapters.base import AdapterConfig, ImportanceVector, register_adapter
from sparsify.adapters.filter_norm import FilterNormAdapter, structure_norms
from sparsify.graph.channel_graph import ChannelGraph

HEAD_KINDS = ("head", "kv_group")


class HeadsConfig(AdapterConfig):
    """Importance of an attention head (or KV group) = L2 norm of its weights."""

    kind: Literal["heads"] = "heads"
    source: Literal["qkvo", "o"] = Field(
        "qkvo", description="weights of the norm: the head's q/k/v rows and output-projection columns "
                            "('qkvo'), or only the output-projection columns ('o')")
    head_dim: bool = Field(False, description="also cover head_dim slot groups (kind 'head_dim': slot j of "
                                              "every head of a layer, where the head count is a constant)")


class HeadsAdapter(FilterNormAdapter):
    """Like ``filter_norm``, restricted to head and KV-group groups, with the output columns in the norm."""

    config: HeadsConfig

    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        out = []
        for group in cg.prunable_groups():
            if group.kind not in HEAD_KINDS + (("head_dim",) if self.config.head_dim else ()):
                self.skipped[group.name] = ("its structures are head_dim slots: set head_dim=True to cover them"
                                            if group.kind == "head_dim" else
                                            f"its structures are {group.kind}s, not attention heads")
                continue
            # head_dim slots: the q/k/v weights only, not tables read with them (rotary cos/sin buffers)
            making = ("out",) if group.kind == "head_dim" else ("out", "value")
            producers = [m for m in group.members if m.role in making]
            columns = [m for m in group.members if m.role == "in"]
            norm = columns if self.config.source == "o" else producers + columns
            if not producers or not norm:
                self.skipped[group.name] = "no weight produces (or reads) these heads"
                continue
            scaled = [m for m in group.members if m.role in (*making, "scale", "bias")]
            handle = {"model": cg.model, "norm": norm, "scaled": scaled}
            out.append(ImportanceVector(group.name, group, torch.arange(group.width).numpy(), self, handle=handle))
        return out

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        """Per head: the L2 norm of every weight in ``handle["norm"]`` that belongs to it."""
        return structure_norms(vector, 2)


register_adapter("heads", HeadsConfig, HeadsAdapter)
