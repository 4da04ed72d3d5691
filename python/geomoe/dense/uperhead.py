"""UPerHead as published for both backbones (the OpenMMLab default structure the release used):
a pyramid pooling module (scales 1, 2, 3, 6) on the stride-32 level, lateral 1x1 convs on the
other levels, a top-down path adding bilinearly upsampled maps, 3x3 fpn convs, every level
upsampled to stride 4 and concatenated, a 3x3 fusion conv, then Dropout2d(0.1) and a 1x1
classifier. Every conv but the classifier: no bias, BatchNorm (SyncBatchNorm under DDP: convert
with nn.SyncBatchNorm.convert_sync_batchnorm), ReLU; 512 channels; bilinear resizes with
align_corners=False.

The loss (`seg_loss`): the logits resized bilinearly to the label's size, cross-entropy with
ignore index 255, averaged over ALL pixels of the batch, ignored ones included (they add 0), as the
published runs did (avg_non_ignore=False)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def _up(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"argument 'num_classes' expected at least 1, got {num_classes}")
        self.in_channels, self.num_classes = tuple(in_channels), num_classes
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_up(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """feats: the 4 levels (strides 4, 8, 16, 32) -> logits [N, classes, H/4, W/4]."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"UPerHead: argument 'feats' expected {len(self.in_channels)} maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class Segmentor(nn.Module):
    """backbone (DenseGeoMoE / DenseMoEViT) + UPerHead. forward(imgs) -> (logits at stride 4, aux),
    aux the backbone's weighted MoE loss (add it to the task loss); `predict` gives logits at the
    input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, num_classes, channels, dropout=dropout)

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor]:
        feats, aux = self.backbone(imgs)
        return self.decode_head(feats), aux

    def predict(self, imgs: Tensor) -> Tensor:
        logits, _ = self(imgs)
        return _up(logits, imgs.shape[2:])

    def moe_layers(self):
        return self.backbone.moe_layers()


def seg_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy of logits [N, C, h, w] (resized bilinearly to labels' [N, H, W]) averaged over
    every pixel, the ignored ones counting as 0 (the published mean)."""
    if labels.shape[-2:] != logits.shape[-2:]:
        logits = _up(logits, labels.shape[-2:])
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 / fp16 logits: the loss in fp32
    loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    return loss.mean()
