"""Independent naive implementations (per-token and per-expert Python loops, float64) that the ops and
layers are checked against. Written the way the published code reads, not the way our ops work."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def naive_gating(logits, bias, k, score_func="sigmoid", renormalize=True):
    """The selection contract of topk_gating, token by token: the k experts of largest score + bias
    (computed in the logits' dtype), NaN after every number (-inf too), equal values (NaN with NaN,
    -0.0 with 0.0) to the lower id; weights are the chosen scores (NaN where a chosen score is)."""
    T, E = logits.shape
    scores = torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, -1)
    weights = torch.zeros(T, k, dtype=logits.dtype)
    ids = torch.zeros(T, k, dtype=torch.int64)
    for t in range(T):
        sel = []
        for e in range(E):
            v = float(scores[t, e] if bias is None else scores[t, e] + bias[e])
            sel.append((v == v, v if v == v else 0.0, -e))  # a number before NaN, then by value, then lower id
        top = sorted(sel, reverse=True)[:k]
        for j, (_, _, neg_e) in enumerate(top):
            ids[t, j] = -neg_e
            weights[t, j] = scores[t, -neg_e]
        if renormalize:
            weights[t] = weights[t] / weights[t].sum()
    counts = torch.zeros(E, dtype=torch.int64)
    for t in range(T):
        for j in range(k):
            counts[ids[t, j]] += 1
    prob_mean = sum(scores[t] / scores[t].sum() for t in range(T)) / T
    return weights, ids, counts, prob_mean


def naive_route(ids, E):
    T, k = ids.shape
    rows = [t * k + j for e in range(E) for t in range(T) for j in range(k) if ids[t, j] == e]
    row_to_flat = torch.tensor(rows, dtype=torch.int64)
    flat_to_row = torch.empty_like(row_to_flat)
    for r, f in enumerate(rows):
        flat_to_row[f] = r
    offsets = [0]
    for e in range(E):
        offsets.append(offsets[-1] + int((ids == e).sum()))
    return row_to_flat, flat_to_row, torch.tensor(offsets)


def apply_act(name, h):
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    if name == "swiglu":
        a, b = h.chunk(2, -1)
        return F.silu(a) * b
    if name == "swiglu_interleaved":  # columns [g0, u0, g1, u1, ...]
        pairs = h.unflatten(-1, (h.shape[-1] // 2, 2))
        return F.silu(pairs[..., 0]) * pairs[..., 1]
    return h


def naive_grouped_mm(x, w, offsets, bias, act):
    outs = []
    for e in range(w.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        h = x[lo:hi] @ w[e]
        if bias is not None:
            h = h + bias[e]
        outs.append(apply_act(act, h))
    return torch.cat(outs)


class Expert(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden if act == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        return self.fc2(apply_act(self.act, self.fc1(x)))


class OriginalMoE(nn.Module):
    """The published MoE MLP: one nn.Linear pair per expert, a loop over experts, index_add_ combine.
    Its state dict is in the original key layout."""

    def __init__(self, dim, hidden, num_experts, num_shared, top_k, score_func="sigmoid", renormalize=True, act="gelu"):
        super().__init__()
        assert num_shared in (0, 1)
        self.k, self.E, self.score_func, self.renormalize = top_k, num_experts, score_func, renormalize
        self.gate = nn.Linear(dim, num_experts)
        self.unique_experts = nn.ModuleList(Expert(dim, hidden, act) for _ in range(num_experts))
        self.share_experts = Expert(dim, hidden, act) if num_shared else None
        self.register_buffer("bias", torch.zeros(num_experts))
        for p in self.parameters():  # non-zero biases so every term is checked
            nn.init.normal_(p, std=0.3)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        T = flat.shape[0]
        logits = self.gate(flat)
        s = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, -1)
        sel = s + self.bias if self.score_func == "sigmoid" else s
        ids = torch.topk(sel, self.k, dim=-1).indices
        w = s.gather(1, ids)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(flat)
        counts = torch.zeros(self.E, dtype=torch.int64)
        for e in range(self.E):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            counts[e] = tok.numel()
            if tok.numel():
                y = y.index_add(0, tok, w[tok, slot, None] * self.unique_experts[e](flat[tok]))
        if self.share_experts is not None:
            y = y + self.share_experts(flat)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        Fr = self.E * counts.to(s.dtype) / (self.k * T)
        return y.view_as(x), (P * Fr).sum(), counts


class OriginalMoEViT(nn.Module):
    """The published MoE-ViT classification computation, written from its description with the
    original module names: conv patch embedding, cls token, a sin-cos table with a zero cls row
    (a frozen parameter, as the original saves it), 12 pre-norm blocks (block 0 a dense MLP, the rest
    the loop MoE), mean of the patch tokens, fc_norm, head. Returns (logits, per-layer aux)."""

    def __init__(self, num_classes, img_size=224, dim=768, depth=12, heads=12, hidden=576, experts=23, top_k=3):
        super().__init__()
        from geomoe.pos_embed import sincos_2d

        g = img_size // 16
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        table = torch.cat([torch.zeros(1, dim), sincos_2d(dim, g, g)])[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = Expert(dim, 4 * dim, "gelu") if i == 0 else OriginalMoE(dim, hidden, experts, 1, top_k)
            self.blocks.append(b)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def _attn(self, b, x):
        B, L, C = x.shape
        qkv = b.attn.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = torch.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5, dim=-1)
        return b.attn.proj((a @ v).transpose(1, 2).reshape(B, L, C))

    def forward(self, imgs):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        auxes = []
        for i, b in enumerate(self.blocks):
            x = x + self._attn(b, b.norm1(x))
            if i == 0:
                x = x + b.mlp(b.norm2(x))
            else:
                y, aux, _ = b.mlp(b.norm2(x))
                x = x + y
                auxes.append(aux)
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1))), torch.stack(auxes)
