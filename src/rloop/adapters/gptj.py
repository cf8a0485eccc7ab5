"""GPT-J: separate q/k/v projections (no bias), partial rotary on q and k, parallel block.

Block ``transformer.h[i]``: ``attn.{q,k,v}_proj``, ``attn.out_proj``, ``mlp``; final norm
``transformer.ln_f``. Attention and MLP both read ``ln_1`` of the block input and are added
to the residual together.
"""

from rloop.adapters.base import Adapter, standard_points

GPTJ = Adapter(
    family="gptj",
    model_types=("gptj",),
    layers_path="transformer.h",
    final_norm_path="transformer.ln_f",
    points=standard_points(
        attn="attn",
        q="attn.q_proj",
        k="attn.k_proj",
        v="attn.v_proj",
        o="attn.out_proj",
        mlp="mlp",
    ),
    parallel_attn_mlp=lambda config: True,
)
