"""Oriented R-CNN (le90) as the published DIOR-R config, on geomoe_kernels' rotated-box ops.

The same backbone protocol, FPN and anchors as the horizontal detector (faster_rcnn.py); then:
- oriented RPN: 6 deltas an anchor (MidpointOffsetCoder, stds 1, 1, 1, 1, 0.5, 0.5); anchors matched
  to the ground truths' enclosing horizontal boxes (MaxIoUAssigner 0.7 / 0.3 / 0.3, low-quality
  matches), only anchors inside the image (allowed_border 0), 256 samples half positive at most;
  sigmoid cross-entropy and smooth L1 (beta 1/9), each over the number of samples. Proposals: the
  2000 best a level, decoded to rotated boxes, empty ones dropped, NMS 0.8 on their enclosing
  horizontal boxes within each level, the 2000 best an image (training and test alike).
- RoI head: proposals plus the ground truths, MaxIoUAssigner 0.5 / 0.5 / 0.5 on rotated IoU, 512
  samples a quarter positive at most; RoIAlignRotated 7 x 7, sampling ratio 2, aligned, clockwise,
  on level floor(log2(sqrt(w h) / 56)) clamped to 0..3; two shared FC 1024; 21 logits and 5
  class-agnostic deltas (DeltaXYWHTCoder, stds .1, .1, .2, .2, .1); cross-entropy and smooth L1
  (beta 1), each over the number of samples.
- Test: softmax scores; per class, boxes scoring above 0.05; rotated NMS 0.1 within each class;
  the 2000 best an image.
Boxes are le90 (cx, cy, w, h, angle): geomoe.detection.rbox."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomoe_kernels import box_iou_rotated, nms_rotated, roi_align_rotated
from geomoe_kernels.ops.nms import nms

from .boxes import AnchorGenerator, MaxIoUAssigner, RandomSampler, pairwise_iou
from .faster_rcnn import FPN, RPNHead, Shared2FCBBoxHead
from .rbox import DeltaXYWHTCoder, MidpointOffsetCoder, rbox_to_hbox


@dataclass(frozen=True)
class OrientedConfig:
    num_classes: int = 20
    fpn_channels: int = 256
    strides: Tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_scales: Tuple[float, ...] = (8.0,)
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_assigner: MaxIoUAssigner = MaxIoUAssigner(0.7, 0.3, 0.3, True)
    rpn_sampler: RandomSampler = RandomSampler(256, 0.5)
    rpn_proposals: Tuple[int, float, int] = (2000, 0.8, 2000)  # nms_pre a level, NMS IoU, kept an image
    roi_assigner: MaxIoUAssigner = MaxIoUAssigner(0.5, 0.5, 0.5, False)
    roi_sampler: RandomSampler = RandomSampler(512, 0.25)
    roi_size: int = 7
    roi_sampling_ratio: int = 2
    finest_scale: float = 56.0
    fc_channels: int = 1024
    score_thr: float = 0.05
    nms_iou: float = 0.1
    max_per_img: int = 2000


def smooth_l1(x: Tensor, beta: float) -> Tensor:
    """Summed smooth L1 of the differences x."""
    a = x.abs()
    return torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta).sum()


def rotated_roi_levels(rois: Tensor, num_levels: int = 4, finest_scale: float = 56.0) -> Tensor:
    """The FPN level of each rotated RoI [K, 6] (batch, cx, cy, w, h, angle) by sqrt(w h)."""
    scale = torch.sqrt(rois[:, 3] * rois[:, 4])
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).to(torch.int64)


class RotatedBBoxHead(Shared2FCBBoxHead):
    """Shared2FC with class-agnostic rotated-box deltas (5)."""

    def __init__(self, in_channels: int, roi_size: int, fc_channels: int, num_classes: int):
        super().__init__(in_channels, roi_size, fc_channels, num_classes)
        self.fc_reg = nn.Linear(fc_channels, 5)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_reg.bias)


class OrientedRCNN(nn.Module):
    """forward(images [B, 3, H, W] normalised, H and W multiples of 32; image_sizes [(h, w)];
    targets: per image {"boxes": [G, 5] le90, "labels": [G]}) -> losses (training, "aux" the
    backbone's) or per image {"boxes" [n, 5], "scores", "labels"} (eval)."""

    def __init__(self, backbone: nn.Module, config: OrientedConfig = OrientedConfig()):
        super().__init__()
        self.backbone = backbone
        self.config = c = config
        self.neck = FPN(list(backbone.out_channels), c.fpn_channels)  # type: ignore[arg-type]
        self.anchors = AnchorGenerator(c.strides, c.anchor_scales, c.anchor_ratios)
        self.rpn_head = RPNHead(c.fpn_channels, self.anchors.num_anchors, box_dims=6)
        self.roi_head = RotatedBBoxHead(c.fpn_channels, c.roi_size, c.fc_channels, c.num_classes)
        self.rpn_coder = MidpointOffsetCoder()
        self.roi_coder = DeltaXYWHTCoder()
        self.generator: Optional[torch.Generator] = None  # the samplers' (None: torch's global one)

    def forward(
        self,
        images: Tensor,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
    ):
        if images.dim() != 4 or images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(
                f"OrientedRCNN: argument 'images' expected [B, 3, H, W] with H and W multiples of 32, got {list(images.shape)}"
            )
        B = images.shape[0]
        sizes = list(image_sizes) if image_sizes is not None else [tuple(images.shape[2:])] * B
        feats, aux = self.backbone(images)
        if len(feats) != 4:
            raise ValueError(f"OrientedRCNN: the backbone returned {len(feats)} feature maps, expected 4 (strides 4, 8, 16, 32)")
        feats = self.neck(feats)
        cls, reg = self.rpn_head(feats)
        anchors = self.anchors([tuple(f.shape[2:]) for f in feats], images.device, feats[0].dtype)
        props = self.proposals(cls, reg, anchors)
        if not self.training:
            return self._detect(feats, props)
        if targets is None or len(targets) != B:
            raise ValueError(f"OrientedRCNN: training needs 'targets' for each of the {B} images")
        losses = self._rpn_losses(torch.cat(anchors), torch.cat(cls, 1), torch.cat(reg, 1), targets, sizes)
        losses.update(self._roi_losses(feats, props, targets))
        losses["aux"] = aux
        return losses

    # ---- RPN ------------------------------------------------------------------------------------------
    def _rpn_losses(self, anchors, cls_logits, deltas, targets, sizes) -> Dict[str, Tensor]:
        c = self.config
        cls_sum, reg_sum, samples = cls_logits.new_zeros(()), deltas.sum() * 0, 0  # in the graph (DDP) without positives
        for b, (t, (h, w)) in enumerate(zip(targets, sizes)):
            gt = t["boxes"].to(anchors.dtype)
            inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
            overlaps = pairwise_iou(rbox_to_hbox(gt), anchors) if gt.shape[0] else anchors.new_zeros(0, anchors.shape[0])
            assigned, _ = c.rpn_assigner.assign(overlaps)
            assigned = torch.where(inside, assigned, torch.full_like(assigned, -1))
            pos, neg = c.rpn_sampler(assigned, self.generator)
            samples += pos.numel() + neg.numel()
            idx = torch.cat([pos, neg])
            target = torch.cat([cls_logits.new_ones(pos.numel()), cls_logits.new_zeros(neg.numel())])
            cls_sum = cls_sum + F.binary_cross_entropy_with_logits(cls_logits[b, idx], target, reduction="sum")
            if pos.numel():
                tgt = self.rpn_coder.encode(anchors[pos], gt[assigned[pos] - 1])
                reg_sum = reg_sum + smooth_l1(deltas[b, pos] - tgt.to(deltas.dtype), 1 / 9)
        n = max(samples, 1)
        return {"loss_rpn_cls": cls_sum / n, "loss_rpn_bbox": reg_sum / n}

    @torch.no_grad()
    def proposals(self, cls: List[Tensor], reg: List[Tensor], anchors: List[Tensor]) -> List[Tensor]:
        """Per image [P, 5] rotated proposals by decreasing objectness."""
        nms_pre, iou, keep_n = self.config.rpn_proposals
        out = []
        for b in range(cls[0].shape[0]):
            boxes, scores, levels = [], [], []
            for lvl, (c, r, a) in enumerate(zip(cls, reg, anchors)):
                s, top = c[b].float().sigmoid().sort(descending=True, stable=True)
                s, top = s[:nms_pre], top[:nms_pre]
                boxes.append(self.rpn_coder.decode(a[top].float(), r[b, top].float()))
                scores.append(s)
                levels.append(torch.full_like(top, lvl))
            bx, sc, lv = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            ok = (bx[:, 2] > 0) & (bx[:, 3] > 0) & torch.isfinite(bx).all(1)
            bx, sc, lv = bx[ok], sc[ok], lv[ok]
            kept = nms(rbox_to_hbox(bx), sc, iou, lv)[:keep_n]
            out.append(bx[kept])
        return out

    # ---- RoI head -------------------------------------------------------------------------------------
    def roi_features(self, feats: List[Tensor], rois: Tensor) -> Tensor:
        """[K, C, 7, 7]: each rotated RoI [K, 6] pooled from its level."""
        c = self.config
        levels = rotated_roi_levels(rois, 4, c.finest_scale)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], c.roi_size, c.roi_size)
        for lvl in range(4):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if idx.numel():
                pooled = roi_align_rotated(
                    feats[lvl], rois[idx], c.roi_size, 1.0 / c.strides[lvl], c.roi_sampling_ratio, True, True
                )
                out = out.index_copy(0, idx, pooled)
        return out

    def _roi_losses(self, feats, props, targets) -> Dict[str, Tensor]:
        c = self.config
        rois, labels, tgts = [], [], []
        for b, (p, t) in enumerate(zip(props, targets)):
            gt, gl = t["boxes"].to(p.dtype), t["labels"]
            p = torch.cat([gt, p])  # the ground truths join the proposals
            overlaps = box_iou_rotated(gt, p) if gt.shape[0] and p.shape[0] else p.new_zeros(gt.shape[0], p.shape[0])
            assigned, _ = c.roi_assigner.assign(overlaps)
            pos, neg = c.roi_sampler(assigned, self.generator)
            idx = torch.cat([pos, neg])
            lab = torch.full((idx.numel(),), c.num_classes, dtype=torch.int64, device=p.device)
            lab[: pos.numel()] = gl[assigned[pos] - 1]
            tg = p.new_zeros(idx.numel(), 5)
            if pos.numel():
                tg[: pos.numel()] = self.roi_coder.encode(p[pos], gt[assigned[pos] - 1])
            rois.append(torch.cat([p.new_full((idx.numel(), 1), b), p[idx]], 1))
            labels.append(lab)
            tgts.append(tg)
        r, lab, tg = torch.cat(rois), torch.cat(labels), torch.cat(tgts)
        scores, deltas = self.roi_head(self.roi_features(feats, r))
        R = max(r.shape[0], 1)
        pos = lab < c.num_classes
        return {
            "loss_cls": F.cross_entropy(scores, lab, reduction="sum") / R,
            "loss_bbox": smooth_l1(deltas[pos] - tg[pos].to(deltas.dtype), 1.0) / R,
        }

    @torch.no_grad()
    def _detect(self, feats, props) -> List[Dict[str, Tensor]]:
        c = self.config
        r = torch.cat([torch.cat([p.new_full((p.shape[0], 1), b), p], 1) for b, p in enumerate(props)])
        scores, deltas = self.roi_head(self.roi_features(feats, r)) if r.numel() else (None, None)
        out, start = [], 0
        for p in props:
            n = p.shape[0]
            if n == 0 or scores is None or deltas is None:
                out.append(
                    {
                        "boxes": p.new_zeros(0, 5),
                        "scores": p.new_zeros(0),
                        "labels": torch.zeros(0, dtype=torch.int64, device=p.device),
                    }
                )
                continue
            prob = scores[start : start + n].float().softmax(-1)[:, : c.num_classes]
            boxes = self.roi_coder.decode(p, deltas[start : start + n].float())
            start += n
            keep = prob > c.score_thr
            cand, cls = torch.nonzero(keep, as_tuple=True)
            bx, sc = boxes[cand], prob[keep]
            kept = nms_rotated(bx, sc, c.nms_iou, cls)[: c.max_per_img]
            out.append({"boxes": bx[kept], "scores": sc[kept], "labels": cls[kept]})
        return out
