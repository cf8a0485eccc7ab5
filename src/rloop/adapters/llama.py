"""Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM2 (separate q/k/v projections, GQA).

Block ``model.layers[i]``: ``self_attn.{q,k,v,o}_proj`` and ``mlp``; final norm ``model.norm``.
V is the ``v_proj`` output viewed as (n_kv_heads, head_dim); rotary touches only q and k.
This is the Hugging Face decoder layout the :class:`Adapter` defaults describe, so only the
model types are stated here.
"""

from rloop.adapters.base import Adapter

LLAMA = Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"))
