"""Llama family: Llama, Mistral, Qwen2, SmolLM2 (separate q/k/v projections, GQA).

Block ``model.layers[i]``: ``self_attn.{q,k,v,o}_proj`` and ``mlp``; final norm ``model.norm``.
V is the ``v_proj`` output viewed as (n_kv_heads, head_dim); rotary touches only q and k.
"""

from rloop.adapters.base import Adapter, standard_points

LLAMA = Adapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
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
