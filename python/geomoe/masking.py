"""Random token masking as GeoMoE does it: per image, shuffle = argsort(noise); the first
int(L (1 - mask_ratio)) of the shuffle are kept (in that order), the last int(L kept_mask_ratio)
are reconstructed, taken in ascending position order."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Masking(NamedTuple):
    keep: Tensor  # [N, L_keep] kept token ids, in shuffle order
    build: Tensor  # [N, L_build] reconstructed token ids, ascending


def random_masking(
    batch: int, tokens: int, mask_ratio: float, kept_mask_ratio: float, noise: Optional[Tensor] = None, device=None
) -> Masking:
    if noise is None:
        noise = torch.rand(batch, tokens, device=device)
    if noise.shape != (batch, tokens):
        raise ValueError(f"argument 'noise' expected shape [{batch}, {tokens}], got {list(noise.shape)}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"argument 'mask_ratio' expected a value in [0, 1), got {mask_ratio}")
    n_keep = int(tokens * (1 - mask_ratio))
    n_build = int(tokens * kept_mask_ratio)
    if n_keep < 1 or n_build < 1 or n_keep + n_build > tokens:
        raise ValueError(
            f"argument 'kept_mask_ratio' with mask_ratio {mask_ratio} expected at least one kept and one rebuilt token "
            f"among {tokens} and no overlap, got {n_keep} kept and {n_build} rebuilt"
        )
    shuffle = torch.argsort(noise, dim=1)
    keep = shuffle[:, :n_keep].contiguous()
    build = torch.sort(shuffle[:, tokens - n_build :], dim=1).values.contiguous()
    return Masking(keep, build)


def visibility_map(keep: Tensor, grid: int, cells_per_side: int) -> Tensor:
    """[N, 1, grid * c, grid * c] float map, 1 at cells of kept tokens: the dense path's mask."""
    N = keep.shape[0]
    vis = torch.zeros(N, grid * grid, device=keep.device)
    vis.scatter_(1, keep, 1.0)
    vis = vis.view(N, 1, grid, grid)
    return vis.repeat_interleave(cells_per_side, dim=2).repeat_interleave(cells_per_side, dim=3)
