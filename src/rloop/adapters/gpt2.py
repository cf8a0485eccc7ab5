"""GPT-2: one fused ``c_attn`` projection (a Conv1D) laid out as [q | k | v] blocks.

Block ``transformer.h[i]``: ``attn.c_attn`` (out width 3*d_model), ``attn.c_proj`` (output
projection), ``mlp``; final norm ``transformer.ln_f``. transformers splits the fused output
into three d_model-wide blocks and views each as (H, D), so head h's value vector sits at
columns ``2*d_model + h*D .. 2*d_model + (h+1)*D`` — unlike GPT-NeoX's per-head interleaving.
Serves model type ``gpt2`` (the default, the family name).
"""

from rloop.adapters.base import Adapter, fused_qkv_points

GPT2 = Adapter(
    family="gpt2",
    layers_path="transformer.h",
    final_norm_path="transformer.ln_f",
    points=fused_qkv_points(attn="attn", qkv="c_attn", out="c_proj", layout="blocks"),
)
