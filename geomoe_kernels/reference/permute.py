"""Token permutation into expert-major order and the weighted combine back.

A routed row is named by its flat index f = t * top_k + slot. `row_to_flat[r]` is the flat index of
expert-major row r (stable: increasing f within an expert); `flat_to_row` is its inverse; `offsets`
[E + 1] bounds each expert's rows. The combine reads each token's top_k rows through `flat_to_row`
and reduces them in a fixed order: no atomics, the same bits every run."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def route(expert_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    flat = expert_ids.reshape(-1)
    row_to_flat = torch.argsort(flat, stable=True)
    flat_to_row = torch.empty_like(row_to_flat)
    flat_to_row[row_to_flat] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return row_to_flat, flat_to_row, offsets


def permute(x: Tensor, row_to_flat: Tensor, top_k: int, weights: Optional[Tensor]) -> Tensor:
    rows = x.index_select(0, torch.div(row_to_flat, top_k, rounding_mode="floor"))
    if weights is None:
        return rows
    acc = accumulate_dtype(x.dtype)
    scale = weights.reshape(-1).to(acc).index_select(0, row_to_flat)
    return (rows.to(acc) * scale[:, None]).to(x.dtype)


def unpermute(rows: Tensor, flat_to_row: Tensor, top_k: int, weights: Optional[Tensor], shared: Optional[Tensor]) -> Tensor:
    acc = accumulate_dtype(rows.dtype)
    T, d = flat_to_row.numel() // top_k, rows.shape[1]
    picked = rows.index_select(0, flat_to_row).view(T, top_k, d).to(acc)
    if weights is not None:
        picked = picked * weights.to(acc)[..., None]
    out = picked.sum(dim=1)
    if shared is not None:
        out = out + shared.to(acc)
    return out.to(rows.dtype)


def unpermute_weight_grad(grad_out: Tensor, rows: Tensor, flat_to_row: Tensor, top_k: int) -> Tensor:
    """d loss / d weights [T, top_k] for the weighted combine, in the accumulation dtype."""
    acc = accumulate_dtype(rows.dtype)
    T, d = grad_out.shape
    picked = rows.index_select(0, flat_to_row).view(T, top_k, d).to(acc)
    return (picked * grad_out.to(acc)[:, None, :]).sum(dim=-1)
