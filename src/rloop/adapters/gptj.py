"""GPT-J: separate q/k/v projections (no bias), partial rotary on q and k, parallel block.

Block ``transformer.h[i]``: ``attn.{q,k,v}_proj``, ``attn.out_proj``, ``mlp``; final norm
``transformer.ln_f``. Attention and MLP both read ``ln_1`` of the block input and are added
to the residual together. Serves model type ``gptj`` (the default, the family name).
"""

from rloop.adapters.base import Adapter, separate_qkv_points

GPTJ = Adapter(
    family="gptj",
    layers_path="transformer.h",
    final_norm_path="transformer.ln_f",
    points=separate_qkv_points(attn="attn", out="out_proj"),
    parallel_attn_mlp=lambda config: True,
)
