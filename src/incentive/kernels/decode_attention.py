"""Attention of one new token per row over its KV cache, through an AVX-512 kernel of ours
(``decode_attention.cpp``) where the kernels are built, else ``scaled_dot_product_attention``.

In a decode step of the embedded model on a 2-core Xeon, SDPA took ~11 ms of ~80 (30 layers, 16 rows, ~150
cached positions): its flash kernel is built for many queries, and here each of 48 (row, key/value head)
pairs has three. The kernel scores the queries of a key/value head against each allowed key, takes an exact
softmax and sums the values, in a fixed order (deterministic, independent of the thread count); results agree
with SDPA to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from incentive.kernels import build


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [rows, heads, 1, dim] (one query per row), keys and values [rows, kv_heads, length, dim], ``allowed``
    [rows, length] (True: attend) -> [rows, 1, heads * dim]. Grouped queries share their key/value head, as
    in transformers' SDPA path."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    ops = build.ops_for(q, keys, values)
    if ops is not None:
        return ops.decode_attention(q[:, :, 0], keys, values, allowed, scale).view(rows, 1, heads * dim)
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=allowed[:, None, None, :], scale=scale
    )
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).reshape(rows, 1, -1)
