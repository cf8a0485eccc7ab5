"""Gemma-3 (text): separate q/k/v projections, GQA, q/k RMS norms, sandwich norms.

Block ``model.layers[i]``: ``self_attn.{q,k,v,o}_proj``, ``mlp``; final norm ``model.norm``
(the :class:`Adapter` defaults, so only the model type is stated here).
Gemma-3 normalises q and k per head (``q_norm``, ``k_norm``) but not v, so V is the
``v_proj`` output viewed as (n_kv_heads, head_dim). ``attn_out`` and ``mlp_out`` are the
module outputs *before* Gemma's post-attention / post-feed-forward norms, which the block
applies before adding to the residual stream.
"""

from rloop.adapters.base import Adapter

GEMMA3 = Adapter(family="gemma3", model_types=("gemma3_text",))
