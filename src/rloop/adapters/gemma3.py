"""Gemma-3 (text): separate q/k/v projections, GQA, q/k RMS norms, sandwich norms.

Block ``model.layers[i]``: ``self_attn.{q,k,v,o}_proj``, ``mlp``; final norm ``model.norm``.
Gemma-3 normalises q and k per head (``q_norm``, ``k_norm``) but not v, so V is the
``v_proj`` output viewed as (n_kv_heads, head_dim). ``attn_out`` and ``mlp_out`` are the
module outputs *before* Gemma's post-attention / post-feed-forward norms, which the block
applies before adding to the residual stream.
"""

from rloop.adapters.base import Adapter, standard_points

GEMMA3 = Adapter(
    family="gemma3",
    model_types=("gemma3_text",),
    layers_path="model.layers",
    final_norm_path="model.norm",
    points=standard_points(
        attn="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        mlp="mlp",
    ),
)
