"""Hugging Face attention classes that are LLaMA's attention code (transformers 5), by ``config.model_type``.

LLaMA's code: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear layers, heads split by
``view(*input_shape, -1, head_dim)``, merged by ``reshape(*input_shape, -1)``, and the attention
function of ``ALL_ATTENTION_FUNCTIONS`` (or the module's ``eager_attention_forward``), which repeats the
key/value heads ``num_key_value_groups`` times. Every size its forward() passes to view/reshape/expand
is then a tensor shape, ``head_dim`` (never pruned) or ``num_key_value_groups`` (kept in sync after
pruning), so the classes are registered with synced sizes (``sparsify.hf.syncs``).

The list is explicit, each class read against ``LlamaAttention.forward``; what differs is named below
and changes no size. Classes with other code stay conservative (their KV groups are refused): OLMo-2 and
OLMoE normalise q/k over all heads at once, GPT-OSS has a sink per head, Phi-3 and others fuse q|k|v.
``tests/hf/test_llama_like.py`` runs the exactness oracle on every entry.
"""

from __future__ import annotations

#: model_type → (attention class under ``transformers.models``, what its forward() adds to LLaMA's)
ATTENTION: dict[str, tuple[str, str]] = {
    "llama": ("llama.modeling_llama.LlamaAttention", ""),
    "mistral": ("mistral.modeling_mistral.MistralAttention", "sliding_window"),
    "qwen2": ("qwen2.modeling_qwen2.Qwen2Attention", "sliding_window"),
    "qwen3": ("qwen3.modeling_qwen3.Qwen3Attention", "sliding_window; RMSNorm(head_dim) on each head of q, k"),
    "mixtral": ("mixtral.modeling_mixtral.MixtralAttention", "sliding_window"),
    "qwen2_moe": ("qwen2_moe.modeling_qwen2_moe.Qwen2MoeAttention", ""),
    "qwen3_moe": ("qwen3_moe.modeling_qwen3_moe.Qwen3MoeAttention", "as qwen3"),
    "phimoe": ("phimoe.modeling_phimoe.PhimoeAttention", ""),
    "granitemoe": ("granitemoe.modeling_granitemoe.GraniteMoeAttention", ""),
    "granite": ("granite.modeling_granite.GraniteAttention", ""),
    "gemma": ("gemma.modeling_gemma.GemmaAttention", ""),
    "gemma2": ("gemma2.modeling_gemma2.Gemma2Attention", "sliding_window; logit softcap (element-wise)"),
    "cohere": ("cohere.modeling_cohere.CohereAttention", "optional LayerNorm per head of q, k (weights per head)"),
    "cohere2": ("cohere2.modeling_cohere2.Cohere2Attention", "sliding_window; RoPE on sliding layers only"),
    "olmo": ("olmo.modeling_olmo.OlmoAttention", "optional clamp of q, k, v (element-wise)"),
    "helium": ("helium.modeling_helium.HeliumAttention", ""),
    "seed_oss": ("seed_oss.modeling_seed_oss.SeedOssAttention", "dropout on the output"),
    "ministral": ("ministral.modeling_ministral.MinistralAttention", "sliding_window"),
    "exaone4": ("exaone4.modeling_exaone4.Exaone4Attention", "RMSNorm(head_dim) on each head of q, k; "
                                                              "RoPE on some layers"),
    "hunyuan_v1_dense": ("hunyuan_v1_dense.modeling_hunyuan_v1_dense.HunYuanDenseV1Attention",
                         "RMSNorm(head_dim) on each head of q, k"),
    "ernie4_5": ("ernie4_5.modeling_ernie4_5.Ernie4_5Attention", "interleaved RoPE (within each head)"),
    "smollm3": ("smollm3.modeling_smollm3.SmolLM3Attention", "sliding_window; RoPE on some layers"),
    "starcoder2": ("starcoder2.modeling_starcoder2.Starcoder2Attention", "sliding_window; dropout on the output"),
    "glm": ("glm.modeling_glm.GlmAttention", "partial interleaved RoPE (within each head)"),
    "glm4": ("glm4.modeling_glm4.Glm4Attention", "partial interleaved RoPE (within each head)"),
    "arcee": ("arcee.modeling_arcee.ArceeAttention", ""),
    "apertus": ("apertus.modeling_apertus.ApertusAttention", "RMSNorm(head_dim) on each head of q, k"),
    "nemotron": ("nemotron.modeling_nemotron.NemotronAttention", "partial RoPE (within each head)"),
    "dots1": ("dots1.modeling_dots1.Dots1Attention", "as qwen3"),
}

#: model types whose decoder layers are LLaMA's too: ``self_attn`` as above and ``mlp`` with gate_proj
#: (Arcee, Apertus, Nemotron: none), up_proj, down_proj (GLM: gate_up_proj, down_proj; StarCoder2: c_fc, c_proj)
#: (config: intermediate_size, num_attention_heads, num_key_value_heads, head_dim)
DENSE_LAYERS = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "cohere", "cohere2", "olmo",
                "helium", "seed_oss", "ministral", "exaone4", "hunyuan_v1_dense", "ernie4_5", "smollm3", "arcee",
                "apertus", "nemotron", "starcoder2", "glm", "glm4")

#: model type → (the decoder layer's attribute, its sparse-MoE block class, the config field of the experts'
#: intermediate width) in every layer; fused 3-D experts (gate|up [E, 2I, H], down [E, H, I]), whose width is
#: a channel group where they run as batched matmuls; the config's attention, experts' (and Qwen2-MoE's
#: shared-expert) widths are synced, the expert counts by ``sparsify.hf.experts``
MOE_LAYERS = {"mixtral": ("mlp", "MixtralSparseMoeBlock", "intermediate_size"),
              "qwen2_moe": ("mlp", "Qwen2MoeSparseMoeBlock", "moe_intermediate_size"),
              "qwen3_moe": ("mlp", "Qwen3MoeSparseMoeBlock", "moe_intermediate_size"),
              "phimoe": ("mlp", "PhimoeSparseMoeBlock", "intermediate_size"),
              "granitemoe": ("block_sparse_moe", "GraniteMoeMoE", "intermediate_size")}


def attention_classes() -> list[str]:
    """The dotted names of the attention classes above."""
    return [f"transformers.models.{name}" for name, _ in ATTENTION.values()]
