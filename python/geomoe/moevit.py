"""The MoE-ViT: the published plain-ViT baseline with GeoMoE's MoE layers (the release's "MoE" model).

A 16x16 patch embedding (a conv with bias, no norm), a cls token, a fixed 2D sin-cos position table
whose cls row is zero, then 12 pre-norm blocks of width 768 and 12 heads: block 0 has a dense MLP
(768 -> 3072 -> 768), blocks 1-11 the MoE MLP (23 routed experts + 1 shared, top-3, sigmoid routing
with the bias buffer, expert hidden 576). The cls token passes through the MoE layers too. Drop path
rises linearly over the 12 blocks from 0 to `drop_path_rate`.

Module names follow the original checkpoint's keys, so `load_original_state_dict` reads the released
encoder-only file. The position table is recomputed, never loaded (`pos_embed` in a file is ignored),
and interpolated bicubically to the input's grid when the input is not the pretraining size."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


from .configs import DECODER_BASE, MOEVIT_BASE
from .layer_decay import param_groups
from .masking import random_masking
from .model import MaskedAutoencoder, check_image_batch
from .moevit_encoder import PATCH, Block, EncoderOutput, MoEViTEncoder, PatchEmbed  # noqa: F401  (the encoder, split out)


class MoEViTClassifier(MoEViTEncoder):
    """Scene classification: mean of the patch tokens (cls dropped), fc_norm, linear head.
    forward(imgs) -> (logits [N, classes], aux [MoE layers])."""

    def __init__(
        self, num_classes: int, img_size: int = MOEVIT_BASE["img_size"], drop_path_rate: float = 0.1, backend: str = "auto", **kw
    ):
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, backend=backend, **kw)
        if num_classes < 1:
            raise ValueError(f"argument 'num_classes' expected at least 1, got {num_classes}")
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor]:
        out = super().forward(imgs)
        return self.head(self.fc_norm(out.tokens[:, 1:].mean(dim=1))), out.aux


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an [N, C, H, W] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MoEViTBackbone(MoEViTEncoder):
    """The published dense-prediction pyramid: the tokens (cls dropped) after blocks `out_indices`
    (3, 5, 7, 11) as stride-16 maps, turned into strides 4 (two 2x2 transposed convs with a channel
    LayerNorm and GELU between), 8 (one), 16 (as is) and 32 (2x2 max-pool); 768 channels each.
    forward(imgs) -> the 4 maps as a tuple; the auxiliary loss of the call, already multiplied by
    `aux_weight`, is kept in `self.aux_loss` for the task loss. The MoE biases are frozen buffers
    here: nothing in the backbone updates them."""

    def __init__(
        self,
        img_size: int = MOEVIT_BASE["img_size"],
        out_indices: Sequence[int] = (3, 5, 7, 11),
        drop_path_rate: float = 0.1,
        aux_weight: float = 5e-6,
        backend: str = "auto",
        **kw,
    ):
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, backend=backend, **kw)
        if len(out_indices) != 4 or any(not 0 <= i < len(self.blocks) for i in out_indices):
            raise ValueError(
                f"argument 'out_indices' expected 4 block indices in [0, {len(self.blocks)}), got {list(out_indices)}"
            )
        C = self.embed_dim
        self.out_indices = tuple(out_indices)
        self.aux_weight = aux_weight
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(C, C, 2, 2), LayerNorm2d(C, eps=1e-6), nn.GELU(), nn.ConvTranspose2d(C, C, 2, 2)
        )
        self.fpn2 = nn.ConvTranspose2d(C, C, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)
        self.aux_loss: Optional[Tensor] = None

    def param_groups(
        self, model: Optional[nn.Module] = None, *, base_lr: float, weight_decay: float = 0.05, layer_decay: float = 0.85
    ) -> List[Dict[str, Any]]:
        """AdamW groups with the published layer-wise lr decay for a detector or segmenter built on
        this backbone (`model`, default the backbone alone): the backbone's parameters take the
        MoE-ViT's ids by their names inside it (the fpn levels, like every neck and head, the last).
        See geomoe.layer_decay.param_groups."""
        return param_groups(self if model is None else model, base_lr, weight_decay, layer_decay, backbone=self)

    @property
    def feature_info(self) -> List[dict]:
        return [dict(num_chs=self.embed_dim, reduction=r, module=f"fpn{i + 1}") for i, r in enumerate((4, 8, 16, 32))]

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        out = super().forward(imgs)
        N, h, w = imgs.shape[0], imgs.shape[2] // PATCH, imgs.shape[3] // PATCH
        maps = [out.hidden[i][:, 1:].transpose(1, 2).reshape(N, self.embed_dim, h, w) for i in self.out_indices]
        self.aux_loss = self.aux_weight * out.aux.sum()
        return tuple(f(m) for f, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps))


class MoEViTMAE(MaskedAutoencoder, MoEViTEncoder):
    """MAE pretraining of the MoE-ViT. Its pretraining code is not published: this assumes GeoMoE's
    objective (mask 0.75, 49 rebuilt tokens, norm-pix loss, the 8-block 512-wide cross-attention
    decoder), the cls token kept beside the visible tokens, no drop path, and a final LayerNorm
    (eps 1e-6, `norm`) on the encoder output as in MAE. forward(imgs) -> (loss, aux [layers],
    loads [layers, experts]), like GeoMoE, so the same trainer runs either model."""

    def __init__(
        self,
        img_size: int = MOEVIT_BASE["img_size"],
        in_chans: int = 3,
        decoder_embed_dim: int = DECODER_BASE["decoder_embed_dim"],
        decoder_depth: int = DECODER_BASE["decoder_depth"],
        decoder_num_heads: int = DECODER_BASE["decoder_num_heads"],
        norm_pix_loss: bool = True,
        backend: str = "auto",
        **kw,
    ):
        kw.setdefault("drop_path_rate", 0.0)
        super().__init__(img_size=img_size, in_chans=in_chans, backend=backend, **kw)
        self.norm_pix_loss = norm_pix_loss
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self._build_decoder(self.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, 4.0)
        self._init_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The cls token and the kept patch tokens (in `keep`'s order) through the blocks."""
        check_image_batch("MoEViTMAE", imgs, self.patch_embed.proj.weight, allow_empty=False)
        if tuple(imgs.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"MoEViTMAE: argument 'imgs' expected shape [N, {self.in_chans}, {self.img_size}, {self.img_size}], "
                f"got {list(imgs.shape)}"
            )
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:].to(imgs.dtype)
        x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[2]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        auxes, loads = [], []
        for block in self.blocks:
            x, aux, load = block(x)
            if aux is not None:
                auxes.append(aux)
                loads.append(load)
        return self.norm(x), torch.stack(auxes), torch.stack(loads)

    def forward(
        self, imgs: Tensor, mask_ratio: float = 0.75, kept_mask_ratio: float = 0.25, noise: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        masking = random_masking(imgs.shape[0], self.grid**2, mask_ratio, kept_mask_ratio, noise, imgs.device)
        latent, aux, load = self.forward_encoder(imgs, masking.keep)
        pred = self.forward_decoder(latent, masking.build)
        return self.forward_loss(imgs, pred, masking.build), aux, load
