"""The MoE-ViT's encoder (patch embedding, cls token, position table, the 12 blocks), apart from
the models built on it (geomoe.moevit), so that code which only needs to recognise the encoder
(geomoe.layer_decay) does not import the models, which import it. geomoe.moevit describes the
architecture."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from geomoe_kernels import MoEMLP
from geomoe_kernels.backend import check_backend_name

from .configs import MOEVIT_BASE
from .model import Attention, DropPath, Mlp, check_image_batch, drop_path_rates, init_linears_and_norms
from .pos_embed import interpolate_pos_embed, sincos_2d

PATCH = 16


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm attention + MLP; the MLP is dense or an MoEMLP (whose aux loss and load it returns)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if isinstance(self.mlp, MoEMLP):
            y, aux, load = self.mlp(self.norm2(x))
            return x + self.drop_path(y), aux, load
        return x + self.drop_path(self.mlp(self.norm2(x))), None, None


class EncoderOutput(NamedTuple):
    tokens: Tensor  # [N, 1 + h*w, C] after the last block (cls first)
    hidden: List[Tensor]  # the tokens after each block
    aux: Tensor  # [MoE layers] auxiliary load-balancing losses
    load: Tensor  # [MoE layers, experts]


class MoEViTEncoder(nn.Module):
    """Patch embedding, cls token, position table and the 12 blocks (no final norm)."""

    # recomputed from the image size, never read from a checkpoint
    ORIGINAL_KEYS_RECOMPUTED = ("pos_embed",)

    def __init__(
        self,
        img_size: int = MOEVIT_BASE["img_size"],
        in_chans: int = 3,
        embed_dim: int = MOEVIT_BASE["embed_dim"],
        depth: int = MOEVIT_BASE["depth"],
        num_heads: int = MOEVIT_BASE["num_heads"],
        mlp_ratio: float = MOEVIT_BASE["mlp_ratio"],
        moe_mlp_ratio: float = MOEVIT_BASE["moe_mlp_ratio"],
        num_experts: int = MOEVIT_BASE["num_experts"],
        num_shared_experts: int = MOEVIT_BASE["num_shared_experts"],
        top_k: int = MOEVIT_BASE["top_k"],
        dense_blocks: Sequence[int] = (0,),
        drop_path_rate: float = 0.1,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend_name(backend)
        if img_size % PATCH:
            raise ValueError(f"argument 'img_size' expected a multiple of {PATCH}, got {img_size}")
        self.img_size, self.in_chans, self.embed_dim = img_size, in_chans, embed_dim
        self.grid = img_size // PATCH
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = torch.cat([torch.zeros(1, embed_dim), sincos_2d(embed_dim, self.grid, self.grid)])
        self.register_buffer("pos_embed", table[None], persistent=False)
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            if i in dense_blocks:
                mlp: nn.Module = Mlp(embed_dim, int(embed_dim * mlp_ratio))
            else:
                mlp = MoEMLP(embed_dim, int(embed_dim * moe_mlp_ratio), num_experts, num_shared_experts, top_k, backend=backend)
            self.blocks.append(Block(embed_dim, num_heads, mlp, rates[i]))
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        init_linears_and_norms(self)

    def moe_layers(self) -> List[MoEMLP]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEMLP)]

    def forward(self, imgs: Tensor) -> EncoderOutput:
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or imgs.shape[2] % PATCH or imgs.shape[3] % PATCH:
            raise ValueError(
                f"MoEViT: argument 'imgs' expected shape [N, {self.in_chans}, H, W] with H and W multiples of "
                f"{PATCH}, got {list(imgs.shape)}"
            )
        check_image_batch("MoEViT", imgs, self.patch_embed.proj.weight, allow_empty=True)
        h, w = imgs.shape[2] // PATCH, imgs.shape[3] // PATCH
        x = self.patch_embed(imgs)
        pos = self.pos_embed
        table = torch.cat([pos[:, :1], interpolate_pos_embed(pos[:, 1:], (h, w))], dim=1).to(x.dtype)
        x = torch.cat([(self.cls_token + table[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype), x + table[:, 1:]], dim=1)
        hidden, auxes, loads = [], [], []
        for block in self.blocks:
            x, aux, load = block(x)
            hidden.append(x)
            if aux is not None:
                auxes.append(aux)
                loads.append(load)
        return EncoderOutput(x, hidden, torch.stack(auxes), torch.stack(loads))
