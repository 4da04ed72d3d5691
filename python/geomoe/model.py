"""GeoMoE: a ConvMAE-style encoder with MoE transformer blocks, pretrained as a masked autoencoder
with a cross-attention decoder (docs/model.md has every number). Built on geomoe_kernels the way
a user's model would be: MoEMLP for the expert MLPs, SparseCBlock and the visible layout for stages 1-2.

front_end="sparse" runs stages 1-2 at visible cells only (exact: the depthwise conv is the only op
mixing positions and reads masked neighbours as zero); "dense" is the published masked computation."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomoe_kernels import MoEMLP, SparseCBlock, layout
from geomoe_kernels.backend import check_backend_name
from geomoe_kernels.nn.moe import check_load

from .configs import DECODER_BASE, GEOMOE_BASE
from .masking import random_masking, visibility_map
from .pos_embed import sincos_2d

PATCH = 16  # pixels per token side: stage strides 4 * 2 * 2
FRONT_ENDS = ("sparse", "dense")


class PatchEmbed(nn.Module):
    """conv (kernel = stride) -> LayerNorm over channels (eps 1e-5) -> GELU."""

    def __init__(self, in_chans: int, dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward_dense(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return self.act(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    def forward_pixels(self, cells: Tensor) -> Tensor:
        """cells [R, Cin * s * s]: one row per output cell, its pixels in (channel, y, x) order."""
        return self.act(self.norm(F.linear(cells, self.proj.weight.flatten(1), self.proj.bias)))

    def forward_rows(self, rows: Tensor) -> Tensor:
        """rows [R, Cin] in Z-order -> [R / s^2, dim]."""
        return self.act(self.norm(layout.strided_conv_rows(rows, self.proj.weight, self.proj.bias)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"argument 'num_heads' expected a divisor of the width {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"argument 'decoder_num_heads' expected a divisor of the width {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, L, C = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, L, H, C // H).transpose(1, 2)
        k, v = self.kv(context).reshape(B, context.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability p and scale
    the kept ones by 1 / (1 - p). The identity in eval mode and at p = 0 (pretraining)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"argument 'drop_path_rate' expected a value in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def drop_path_rates(rate: float, depth: int) -> list:
    """The linear stochastic-depth rule: block i of `depth` drops its branches with probability
    rate * i / (depth - 1) (0 for the first block, `rate` for the last)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"argument 'drop_path_rate' expected a value in [0, 1), got {rate}")
    return torch.linspace(0, rate, depth).tolist()


class CBlock(SparseCBlock):
    """SparseCBlock with stochastic depth on both residual branches of the dense path (fine-tuning
    and the backbone). In eval mode, at drop_path 0 and on the sparse rows it is SparseCBlock exactly."""

    def __init__(self, dim: int, mlp_ratio: float, backend: str = "auto", drop_path: float = 0.0):
        super().__init__(dim, mlp_ratio, backend=backend)
        self.drop_path = DropPath(drop_path)

    def forward_dense(self, x: Tensor, vis: Optional[Tensor] = None) -> Tensor:
        if not self.training or self.drop_path.p == 0.0:
            return super().forward_dense(x, vis)
        h = self.conv1(self._channels_last_norm(self.norm1, x))
        if vis is not None:
            h = vis * h
        x = x + self.drop_path(self.conv2(self.attn(h)))
        h = self.mlp.fc1(self._channels_last_norm(self.norm2, x))
        return x + self.drop_path(self.mlp.fc2(self.mlp.act(h)))


class MoEBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, moe: MoEMLP, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = moe
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y, aux, load = self.mlp(self.norm2(x))
        return x + self.drop_path(y), aux, load


class DecoderBlock(nn.Module):
    """Cross-attention only: queries attend to the encoder output, then an MLP."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder:
    """The pretraining objective both models share: a cross-attention decoder whose queries (mask
    token + decoder position) attend to the encoder output, norm-pix MSE on the rebuilt tokens, and
    the expert-bias update. A subclass builds its encoder and calls `_build_decoder`."""

    def _build_decoder(
        self, context_dim: int, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, mlp_ratio: float
    ) -> None:
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, self.grid, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(decoder_embed_dim, context_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, PATCH * PATCH * self.in_chans)

    def forward_decoder(self, latent: Tensor, build: Tensor) -> Tensor:
        N, Lb = build.shape
        pos = torch.gather(
            self.decoder_pos_embed.expand(N, -1, -1), 1, build[:, :, None].expand(-1, -1, self.mask_token.shape[2])
        )
        x = (self.mask_token + pos).to(latent.dtype)
        for blk in self.decoder_blocks:
            x = blk(x, latent)
        return self.decoder_pred(self.decoder_norm(x))

    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L, 16*16*C], ordered (patch row, patch col, pixel row, pixel col, channel)."""
        N, C, H, W = imgs.shape
        h, w = H // PATCH, W // PATCH
        x = imgs.reshape(N, C, h, PATCH, w, PATCH)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, PATCH * PATCH * C)

    def forward_loss(self, imgs: Tensor, pred: Tensor, build: Tensor) -> Tensor:
        target = self.patchify(imgs)
        target = torch.gather(target, 1, build[:, :, None].expand(-1, -1, target.shape[2]))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return ((pred.to(target.dtype) - target) ** 2).mean()

    @torch.no_grad()
    def update_expert_biases(self, loads: Tensor, rate: float = 1e-3) -> None:
        """The published rule per layer (docs/model.md): b += rate where the load is below the mean, -= rate
        above; `loads` [layers, experts] already summed over the data-parallel ranks."""
        layers = self.moe_layers()
        if not isinstance(loads, Tensor) or loads.dim() != 2 or loads.shape[0] != len(layers):
            got = f"shape {list(loads.shape)}" if isinstance(loads, Tensor) else type(loads).__name__
            raise ValueError(
                f"{type(self).__name__}.update_expert_biases: argument 'loads' expected shape [{len(layers)}, experts] "
                f"(one row per MoE layer), got {got}"
            )
        for i, (moe, load) in enumerate(zip(layers, loads)):  # every layer's load checked before any bias moves
            check_load(f"{type(self).__name__}.update_expert_biases", load, moe.num_experts, rate, f"loads[{i}]")
        for moe, load in zip(layers, loads):
            moe._apply_bias_update(load, rate)


def check_image_batch(owner: str, imgs: Tensor, like: Tensor, allow_empty: bool) -> None:
    """Images must be floating point in the model's dtype (`like`; under autocast any float dtype),
    and with allow_empty=False at least one."""
    if not isinstance(imgs, Tensor):
        raise ValueError(f"{owner}: argument 'imgs' expected a tensor [N, C, H, W], got {type(imgs).__name__}")
    if not imgs.is_floating_point():
        raise ValueError(
            f"{owner}: argument 'imgs' expected normalised floating-point images of dtype {like.dtype}, got dtype {imgs.dtype} "
            "(uint8 pixels: convert with .float() / 255, then normalise by the ImageNet mean and std)"
        )
    if imgs.dtype != like.dtype and not torch.is_autocast_enabled(imgs.device.type):
        raise ValueError(f"{owner}: argument 'imgs' expected dtype {like.dtype} (the model's parameters'), got {imgs.dtype}")
    if not allow_empty and imgs.dim() >= 1 and imgs.shape[0] == 0:
        raise ValueError(f"{owner}: argument 'imgs' expected at least one image, got a batch of 0 (shape {list(imgs.shape)})")


def init_linears_and_norms(model: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _triple(v, name: str) -> Tuple:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
    if len(t) != 3:
        raise ValueError(f"argument '{name}' expected one value or three (one per stage), got {v!r}")
    return t


class GeoMoEEncoderBase(nn.Module):
    """The encoder's modules (original names: patch_embed1-4, blocks1-3, pos_embed) and the pieces of
    its forward that pretraining and the downstream backbone share."""

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        embed_dim: Sequence[int],
        depth: Sequence[int],
        num_heads: int,
        mlp_ratio: Union[float, Sequence[float]],
        moe_mlp_ratio: float,
        num_experts: int,
        num_shared_experts: int,
        top_k: int,
        backend: str,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % PATCH or img_size <= 0:
            raise ValueError(f"argument 'img_size' expected a positive multiple of {PATCH}, got {img_size}")
        check_backend_name(backend)
        e1, e2, e3 = _triple(embed_dim, "embed_dim")
        d1, d2, d3 = _triple(depth, "depth")
        self.mlp_ratios = _triple(mlp_ratio, "mlp_ratio")
        r1, r2, _ = self.mlp_ratios
        self.embed_dims = (e1, e2, e3)
        self.img_size, self.in_chans = img_size, in_chans
        self.grid = img_size // PATCH
        self.backend = backend
        self.num_experts = num_experts

        self.patch_embed1 = PatchEmbed(in_chans, e1, 4)
        self.patch_embed2 = PatchEmbed(e1, e2, 2)
        self.patch_embed3 = PatchEmbed(e2, e3, 2)
        self.patch_embed4 = nn.Linear(e3, e3)
        # stochastic depth rises linearly over all d1 + d2 + d3 blocks in order (0 in pretraining)
        dpr = drop_path_rates(drop_path_rate, d1 + d2 + d3)
        self.drop_path_rate = drop_path_rate
        self.blocks1 = nn.ModuleList(CBlock(e1, r1, backend, dpr[i]) for i in range(d1))
        self.blocks2 = nn.ModuleList(CBlock(e2, r2, backend, dpr[d1 + i]) for i in range(d2))
        self.pos_embed = nn.Parameter(sincos_2d(e3, self.grid, self.grid)[None], requires_grad=False)
        self.blocks3 = nn.ModuleList(
            MoEBlock(
                e3,
                num_heads,
                MoEMLP(e3, int(e3 * moe_mlp_ratio), num_experts, num_shared_experts, top_k, backend=backend),
                dpr[d1 + d2 + i],
            )
            for i in range(d3)
        )

    def _init_weights(self) -> None:
        for pe in (self.patch_embed1, self.patch_embed2, self.patch_embed3):
            nn.init.xavier_uniform_(pe.proj.weight.view(pe.proj.weight.shape[0], -1))
        init_linears_and_norms(self)

    def _stages_dense(self, imgs: Tensor, vis1: Optional[Tensor], vis2: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Stage maps [N, C1, H/4, W/4], [N, C2, H/8, W/8] and the stage-3 tokens [N, L, C3] after
        patch_embed4 (before the position table), every cell computed; vis1/vis2 zero masked cells
        before each depthwise conv (None: no mask)."""
        x1 = self.patch_embed1.forward_dense(imgs)
        for blk in self.blocks1:
            x1 = blk(x1, vis1)
        x2 = self.patch_embed2.forward_dense(x1)
        for blk in self.blocks2:
            x2 = blk(x2, vis2)
        x3 = self.patch_embed3.forward_dense(x2).flatten(2).transpose(1, 2)
        return x1, x2, self.patch_embed4(x3)

    def _moe_blocks(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(x, aux losses [layers], expert loads [layers, experts])."""
        auxes, loads = [], []
        for blk in self.blocks3:
            x, aux, load = blk(x)
            auxes.append(aux)
            loads.append(load)
        aux = torch.stack(auxes) if auxes else x.new_zeros(0)
        load = torch.stack(loads) if loads else torch.zeros(0, self.num_experts, dtype=torch.int64, device=x.device)
        return x, aux, load

    def moe_layers(self):
        return [blk.mlp for blk in self.blocks3]


class GeoMoE(MaskedAutoencoder, GeoMoEEncoderBase):
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
        decoder_embed_dim: int = DECODER_BASE["decoder_embed_dim"],
        decoder_depth: int = DECODER_BASE["decoder_depth"],
        decoder_num_heads: int = DECODER_BASE["decoder_num_heads"],
        norm_pix_loss: bool = True,
        front_end: str = "sparse",
        backend: str = "auto",
    ):
        if front_end not in FRONT_ENDS:
            raise ValueError(f"argument 'front_end' expected one of {list(FRONT_ENDS)}, got {front_end!r}")
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
        )
        e1, e2, e3 = self.embed_dims
        self.front_end = front_end
        self.norm_pix_loss = norm_pix_loss
        self.stage1_output_decode = nn.Conv2d(e1, e3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(e2, e3, 2, stride=2)
        self.norm = nn.LayerNorm(e3, eps=1e-6)

        self._build_decoder(e3, decoder_embed_dim, decoder_depth, decoder_num_heads, self.mlp_ratios[2])
        self._init_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- encoder ---------------------------------------------------------------------------------

    def _front_end_dense(self, imgs: Tensor, keep: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """The published computation: every cell, masked cells zeroed before each depthwise conv."""
        G = self.grid
        vis1 = None if keep is None else visibility_map(keep, G, 4).to(imgs.dtype)
        vis2 = None if keep is None else visibility_map(keep, G, 2).to(imgs.dtype)
        x1, x2, x = self._stages_dense(imgs, vis1, vis2)
        s1 = self.stage1_output_decode(x1).flatten(2).transpose(1, 2)
        s2 = self.stage2_output_decode(x2).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:
            idx = keep[:, :, None]
            x, s1, s2 = (torch.gather(t, 1, idx.expand(-1, -1, t.shape[2])) for t in (x, s1, s2))
        return x, s1, s2

    def _front_end_sparse(self, imgs: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Stages 1-2 on the compact visible layout: rows ordered (image, kept token, Z-order cell)."""
        G, N, Lk = self.grid, imgs.shape[0], keep.shape[1]
        pixels = layout.gather_cells(F.pixel_unshuffle(imgs, 4), keep, 4)  # [N*Lk*16, in_chans*16]
        x = self.patch_embed1.forward_pixels(pixels)
        # both stages' neighbour tables from one token-level slot table, once a step: every block of a
        # stage and its backward read its stage's
        stages = [(s, blocks[0].attn.kernel_size[0]) for s, blocks in ((4, self.blocks1), (2, self.blocks2)) if len(blocks)]
        tables = dict(zip([s for s, _ in stages], layout.neighbor_tables(keep, (G, G), stages)))
        nbr1, nbr2 = tables.get(4), tables.get(2)
        for blk in self.blocks1:
            x = blk(x, nbr1)  # through __call__: module hooks (FSDP) must see it
        s1 = layout.strided_conv_rows(x, self.stage1_output_decode.weight, self.stage1_output_decode.bias)
        x = self.patch_embed2.forward_rows(x)
        for blk in self.blocks2:
            x = blk(x, nbr2)
        s2 = layout.strided_conv_rows(x, self.stage2_output_decode.weight, self.stage2_output_decode.bias)
        x = self.patch_embed4(self.patch_embed3.forward_rows(x)).view(N, Lk, -1)
        x = x + torch.gather(self.pos_embed.to(x.dtype).expand(N, -1, -1), 1, keep[:, :, None].expand(-1, -1, x.shape[2]))
        return x, s1.view(N, Lk, -1), s2.view(N, Lk, -1)

    def forward_encoder(self, imgs: Tensor, keep: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """imgs [N, C, H, W], keep [N, L_keep] kept token ids (None: every token, no mask) ->
        (latent [N, L_keep, C3], aux losses [layers], expert loads [layers, experts])."""
        self._check_images(imgs)
        if keep is None or self.front_end == "dense":
            x, s1, s2 = self._front_end_dense(imgs, keep)
        else:
            x, s1, s2 = self._front_end_sparse(imgs, keep)
        x, aux, load = self._moe_blocks(x)
        return self.norm(x + s1 + s2), aux, load

    def _check_images(self, imgs: Tensor) -> None:
        want = (self.in_chans, self.img_size, self.img_size)
        check_image_batch("GeoMoE", imgs, self.patch_embed1.proj.weight, allow_empty=False)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != want:
            raise ValueError(
                f"GeoMoE: argument 'imgs' expected shape [N, {want[0]}, {want[1]}, {want[2]}], got {list(imgs.shape)}"
            )

    def forward(
        self, imgs: Tensor, mask_ratio: float = 0.75, kept_mask_ratio: float = 0.25, noise: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(loss, aux losses [layers], expert loads [layers, experts]) as the original model returns."""
        self._check_images(imgs)
        masking = random_masking(imgs.shape[0], self.grid**2, mask_ratio, kept_mask_ratio, noise, imgs.device)
        latent, aux, load = self.forward_encoder(imgs, masking.keep)
        pred = self.forward_decoder(latent, masking.build)
        return self.forward_loss(imgs, pred, masking.build), aux, load
