"""GPT-NeoX / Pythia: one fused ``query_key_value`` projection, interleaved per head.

Block ``gpt_neox.layers[i]``: ``attention.query_key_value`` (out width 3*H*D), ``attention.dense``
(output projection), ``mlp``; final norm ``gpt_neox.final_layer_norm``. transformers views the
fused output as (B, T, H, 3*D) and chunks the last dim into q, k, v, so head h's value vector
sits at columns ``h*3*D + 2*D .. h*3*D + 3*D``. (GPT-2's fused layout is different: see gpt2.py.)
Pythia uses a parallel residual (attention and MLP both read the block input). Serves model
type ``gpt_neox`` (the default, the family name).
"""

from rloop.adapters.base import Adapter, fused_qkv_points

GPT_NEOX = Adapter(
    family="gpt_neox",
    layers_path="gpt_neox.layers",
    final_norm_path="gpt_neox.final_layer_norm",
    points=fused_qkv_points(
        attn="attention", qkv="query_key_value", out="dense", layout="heads_interleaved"
    ),
    parallel_attn_mlp=lambda config: bool(getattr(config, "use_parallel_residual", True)),
)
