"""The inputs every op's verification case is built from (geomoe_kernels.verify runs the cases; each
op's own lives beside its declaration, ops/_declare.Verification): one small ragged, fixed float64
case on the CPU, the same on every machine. 300 tokens, 7 experts of which one receives no token,
top-3, feature sizes that are not multiples of any tile (40, 36), a masked-image layout with masked
neighbours. A new op takes what fits from here (x, rows, the weights ...) or draws its own from a generator
it seeds itself: a check runs several times on one case, and `generator` moves on between them."""

from __future__ import annotations

from typing import Dict, List, Sequence, cast

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)
T, E, K, D, H, EMPTY = 300, 7, 3, 40, 36, 3  # tokens, experts, top-k, model dim, hidden, the expert with no rows


def case() -> Dict[str, Tensor]:
    """The fixed float64 inputs (CPU), the same on every machine; "generator": the seeded generator
    they were drawn from, for an op that needs inputs of its own."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    others = torch.tensor([e for e in range(E) if e != EMPTY])
    ids = torch.stack([others[torch.randperm(E - 1, generator=g)[:K]] for _ in range(T)])
    ids[:60] = others[:K]  # uneven groups: the first experts get many more rows
    kept = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])  # 2 images, 6 of 16 tokens kept
    return dict(
        logits=r(T, E),
        bias=r(E, scale=0.1),
        ids=ids,
        x=r(T, D),
        rows=r(T * K, D),
        weights=torch.rand(T, K, generator=g, dtype=torch.float64),
        shared=r(T, D),
        w1=r(E, D, H, scale=D**-0.5),
        b1=r(E, H, scale=0.1),
        w2=r(E, H, D, scale=H**-0.5),
        b2=r(E, D, scale=0.1),
        kept=kept,
        conv_x=r(2 * 6 * 4, 24),
        conv_w=r(24, 25, scale=0.2),
        conv_b=r(24, scale=0.1),
        ln_w=1 + r(D, scale=0.1),
        ln_b=r(D, scale=0.1),
        lin_w=r(H, D, scale=D**-0.5),
        lin_b=r(H, scale=0.1),
        g_out=r(T, D),
        g_rows=r(T * K, D),
        g_hidden=r(T * K, H),
        g_conv=r(2 * 6 * 4, 24),
        g_lin=r(T, H),
        generator=g,  # type: ignore[dict-item]
    )


def grads(outs: Sequence[Tensor], upstream: Sequence[Tensor], inputs: Sequence[Tensor]) -> List[Tensor]:
    """d sum(out * upstream) / d inputs (upstream: float64 CPU tensors, moved to the outputs')."""
    loss = sum((o.double() * u.to(o.device)).sum() for o, u in zip(outs, upstream))
    return list(torch.autograd.grad(cast(Tensor, loss), inputs))


def leaves(c, names, device, dtype) -> List[Tensor]:
    """The case's tensors `names` on device in dtype, requiring grad."""
    return [c[n].to(device, dtype).requires_grad_(True) for n in names]
