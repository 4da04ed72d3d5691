"""The pretrained encoder as a backbone for downstream work: dense (no mask) at any input size that
is a multiple of 16, the position table interpolated bicubically, a 4-level pyramid for detection and
segmentation frameworks and mean-pooled token features for classification. The MoE biases are
frozen (never updated); the auxiliary loss is exposed for fine-tuning to add (weight 5e-6).
Stochastic depth (`drop_path_rate`, off by default here; 0.1 in the published fine-tuning) rises
linearly over the 2 + 2 + 11 blocks in order."""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .configs import GEOMOE_BASE
from .layer_decay import param_groups
from .model import PATCH, GeoMoEEncoderBase, check_image_batch
from .pos_embed import interpolate_pos_embed  # noqa: F401  (also public here)


class BackboneOutput(NamedTuple):
    features: Tuple[Tensor, Tensor, Tensor, Tensor]  # strides 4, 8, 16, 32 (the last ceil(H/32) x ceil(W/32))
    pooled: Tensor  # [N, C3] mean of the stage-3 tokens
    aux: Tensor  # [layers] auxiliary load-balancing losses
    load: Tensor  # [layers, experts] assignments per expert


class GeoMoEBackbone(GeoMoEEncoderBase):
    """Keys are the original layout's encoder keys, so `load_original_state_dict` loads the released
    encoder-only file as is. `img_size` is the size the position table was pretrained at.

    forward(imgs) -> BackboneOutput, or with features_only=True the 4 maps alone (a tuple, as
    detection frameworks expect), the auxiliary loss then kept in `self.aux_loss`."""

    def __init__(
        self,
        img_size: int = GEOMOE_BASE["img_size"],
        in_chans: int = 3,
        embed_dim: Sequence[int] = GEOMOE_BASE["embed_dim"],
        depth: Sequence[int] = GEOMOE_BASE["depth"],
        num_heads: int = GEOMOE_BASE["num_heads"],
        mlp_ratio: Union[float, Sequence[float]] = GEOMOE_BASE["mlp_ratio"],
        moe_mlp_ratio: float = GEOMOE_BASE["moe_mlp_ratio"],
        num_experts: int = GEOMOE_BASE["num_experts"],
        num_shared_experts: int = GEOMOE_BASE["num_shared_experts"],
        top_k: int = GEOMOE_BASE["top_k"],
        backend: str = "auto",
        features_only: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(
            img_size,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            moe_mlp_ratio,
            num_experts,
            num_shared_experts,
            top_k,
            backend,
            drop_path_rate,
        )
        self.features_only = features_only
        self.aux_loss: Optional[Tensor] = None
        self._init_weights()

    def param_groups(
        self, model: Optional[nn.Module] = None, *, base_lr: float, weight_decay: float = 0.05, layer_decay: float = 0.85
    ) -> List[Dict[str, Any]]:
        """AdamW groups with the published layer-wise lr decay for a detector or segmenter built on
        this backbone (`model`, default the backbone alone): the backbone's parameters take GeoMoE's
        ids by their names inside it, everything else in `model` (neck, heads) the last id.
        See geomoe.layer_decay.param_groups."""
        return param_groups(self if model is None else model, base_lr, weight_decay, layer_decay, backbone=self)

    @property
    def out_channels(self) -> Tuple[int, int, int, int]:
        e1, e2, e3 = self.embed_dims
        return (e1, e2, e3, e3)

    def forward_features(self, imgs: Tensor) -> BackboneOutput:
        check_image_batch("GeoMoEBackbone", imgs, self.patch_embed1.proj.weight, allow_empty=True)
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or imgs.shape[2] % PATCH or imgs.shape[3] % PATCH:
            raise ValueError(
                f"GeoMoEBackbone: argument 'imgs' expected shape [N, {self.in_chans}, H, W] with H and W multiples of {PATCH}, "
                f"got {list(imgs.shape)}"
            )
        N, _, H, W = imgs.shape
        h, w = H // PATCH, W // PATCH
        c1, c2, x = self._stages_dense(imgs, None, None)
        # a 14x14 table interpolated per call: microseconds, and never stale after a load
        x = x + interpolate_pos_embed(self.pos_embed, (h, w)).to(x.dtype)
        x, aux, load = self._moe_blocks(x)
        c3 = x.transpose(1, 2).reshape(N, x.shape[2], h, w)
        c4 = F.max_pool2d(c3, 2, ceil_mode=True)  # ceil(H/32) x ceil(W/32): defined down to H or W = 16
        return BackboneOutput((c1, c2, c3, c4), x.mean(dim=1), aux, load)

    def forward(self, imgs: Tensor):
        out = self.forward_features(imgs)
        if self.features_only:
            self.aux_loss = out.aux.sum()
            return out.features
        return out
