"""Top-k gating: router logits -> scores -> (score + bias) top-k -> combine weights, counts, and the
mean normalised score per expert that the auxiliary loss needs."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def scores_of(logits: Tensor, score_func: str) -> Tensor:
    return torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)


def selection_order(select: Tensor) -> Tensor:
    """Each row's experts, best first: larger selection score first, NaN after every number (-inf
    included), equal values (NaN with NaN, -0.0 with 0.0) in expert order. Two stable sorts: by
    value (NaN read as -inf), then NaN last, which keeps the first sort's order within each part."""
    nan = torch.isnan(select)
    by_value = torch.sort(select.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    nan_last = torch.sort(nan.gather(1, by_value).to(torch.uint8), dim=-1, stable=True).indices
    return by_value.gather(1, nan_last)


def topk_gating(
    logits: Tensor, bias: Optional[Tensor], top_k: int, score_func: str, renormalize: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    T, E = logits.shape
    scores = scores_of(logits, score_func)
    select = scores if bias is None else scores + bias.to(scores.dtype)
    ids = selection_order(select)[:, :top_k].contiguous()
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = ids.reshape(-1)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).scatter_add_(0, flat, torch.ones_like(flat))
    prob_mean = (scores / scores.sum(dim=-1, keepdim=True)).sum(dim=0) / max(T, 1)
    return weights, ids, counts, prob_mean


def topk_gating_backward(
    grad_weights: Optional[Tensor],
    grad_prob_mean: Optional[Tensor],
    logits: Tensor,
    ids: Tensor,
    score_func: str,
    renormalize: bool,
) -> Tensor:
    T = logits.shape[0]
    s = scores_of(logits, score_func)
    g_s = torch.zeros_like(s)
    if grad_weights is not None:
        gw = grad_weights.to(s.dtype)
        if renormalize:
            sel = s.gather(1, ids)
            total = sel.sum(dim=-1, keepdim=True)
            w = sel / total
            gw = (gw - (gw * w).sum(dim=-1, keepdim=True)) / total
        g_s.scatter_add_(1, ids, gw)  # ids are distinct within a row
    if grad_prob_mean is not None:
        z = s.sum(dim=-1, keepdim=True)
        q = s / z
        gq = (grad_prob_mean.to(s.dtype) / max(T, 1)).expand_as(s)
        g_s = g_s + (gq - (gq * q).sum(dim=-1, keepdim=True)) / z
    if score_func == "sigmoid":
        return g_s * s * (1 - s)
    return s * (g_s - (g_s * s).sum(dim=-1, keepdim=True))
