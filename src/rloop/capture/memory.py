"""Memory budget of a forward pass: how many padded tokens fit, so batches are sized by tokens
(never by rows only) on the CPU and on GPUs."""

from __future__ import annotations

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.adapters.base import text_config

# Activation memory of one block's forward per token, in model-dtype elements, as a multiple
# of (d_model, intermediate): residual, norm output, q/k/v (+ rotary copies), attention
# result and output, MLP in/out; plus one attention-score row per head (eager attention
# materialises (B, H, T, T)); doubled for allocator slack and temporaries.
_BLOCK_ELEMENTS_PER_TOKEN = (12, 2)
_SLACK = 2.0
CPU_BUDGET_BYTES = 1 << 30


def activation_bytes_per_token(model: nn.Module, adapter: Adapter, width: int) -> int:
    """Estimated peak activation bytes one row-token of a ``width``-token forward costs in a
    block."""
    config = text_config(model.config)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inter = int(inter or 4 * adapter.d_model)
    dtype = next(model.parameters()).dtype
    per_d, per_inter = _BLOCK_ELEMENTS_PER_TOKEN
    elements = per_d * adapter.d_model + per_inter * inter + adapter.n_heads * width
    return int(_SLACK * elements * torch.finfo(dtype).bits // 8)


def default_memory_budget(device: torch.device) -> int:
    """Bytes one forward may use: a quarter of the free memory of a CUDA device, 1 GiB on the
    CPU (larger batches do not make CPU matmuls faster)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return CPU_BUDGET_BYTES
