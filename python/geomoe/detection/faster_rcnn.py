"""Faster R-CNN with FPN as the published DIOR config, on geomoe_kernels' nms and roi_align.

The backbone is any module whose forward(images) returns (4 feature maps at strides 4, 8, 16, 32,
an auxiliary loss: a scalar tensor added to the detection losses with weight 1) and whose
`out_channels` gives the 4 maps' channels (the dense backbones of geomoe.dense follow it).

FPN: 1x1 laterals and 3x3 outputs (256 channels, with bias), top-down nearest upsampling to the
lateral's size, a 5th level = max-pool kernel 1 stride 2 of the 4th output. RPN: a shared 3x3 conv
+ ReLU, 1x1 objectness (sigmoid) and 1x1 deltas for 3 anchors a cell; targets from MaxIoUAssigner
(0.7 / 0.3, min_pos 0.3, low-quality matches) and 256 samples (half positive at most); proposals:
the 2000 (test: 1000) best a level, decoded and clipped, empty boxes dropped, NMS 0.7 within each
level, the 1000 best. RoI head: proposals plus the ground truths, MaxIoUAssigner 0.5 / 0.5 / 0.5,
512 samples (a quarter positive at most); RoIAlign 7x7, sampling 0, aligned, on level
floor(log2(sqrt(area) / 56)) clamped to 0..3; two shared FC 1024 + ReLU; 21 logits (background
last) and class-specific deltas (stds 0.1, 0.1, 0.2, 0.2). Losses: sigmoid / softmax cross-entropy
and L1, each summed and divided by the number of samples of the batch (the RPN's both, the RoI
head's both: OpenMMLab's avg_factor). Test: softmax scores, per class boxes above 0.05, NMS 0.5
within each class, the 100 best an image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomoe_kernels._checks import value_checks_enabled
from geomoe_kernels.ops.nms import nms
from geomoe_kernels.ops.roi_align import roi_align

from .boxes import AnchorGenerator, DeltaXYWHCoder, MaxIoUAssigner, RandomSampler, roi_levels


class Backbone(Protocol):
    """What the detector needs of a backbone."""

    out_channels: Sequence[int]

    def __call__(self, images: Tensor) -> Tuple[Sequence[Tensor], Tensor]: ...


@dataclass(frozen=True)
class DetectorConfig:
    num_classes: int = 20
    fpn_channels: int = 256
    strides: Tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_scales: Tuple[float, ...] = (8.0,)
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_assigner: MaxIoUAssigner = MaxIoUAssigner(0.7, 0.3, 0.3, True)
    rpn_sampler: RandomSampler = RandomSampler(256, 0.5)
    rpn_train: Tuple[int, float, int] = (2000, 0.7, 1000)  # nms_pre a level, NMS IoU, kept an image
    rpn_test: Tuple[int, float, int] = (1000, 0.7, 1000)
    roi_assigner: MaxIoUAssigner = MaxIoUAssigner(0.5, 0.5, 0.5, False)
    roi_sampler: RandomSampler = RandomSampler(512, 0.25)
    roi_size: int = 7
    roi_sampling_ratio: int = 0
    roi_aligned: bool = True
    finest_scale: float = 56.0
    fc_channels: int = 1024
    roi_stds: Tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> List[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int, box_dims: int = 4):
        super().__init__()
        self.box_dims = box_dims  # deltas an anchor: 4, or the oriented RPN's 6
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * box_dims, 1)
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level [B, H*W*A] objectness logits and [B, H*W*A, box_dims] deltas (the anchors' order)."""
        cls, reg = [], []
        for f in feats:
            x = F.relu(self.rpn_conv(f))
            B = x.shape[0]
            cls.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(B, -1))
            reg.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(B, -1, self.box_dims))
        return cls, reg


class Shared2FCBBoxHead(nn.Module):
    def __init__(self, in_channels: int, roi_size: int, fc_channels: int, num_classes: int):
        super().__init__()
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, num_classes * 4)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


def rpn_loss(
    anchors: Tensor,
    cls_logits: Tensor,
    deltas: Tensor,
    gt_boxes: Sequence[Tensor],
    assigner: MaxIoUAssigner,
    sampler: RandomSampler,
    coder: DeltaXYWHCoder,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """anchors [A, 4] (all levels), cls_logits [B, A], deltas [B, A, 4]: the RPN's losses."""
    cls_sum = cls_logits.new_zeros(())
    reg_sum = deltas.sum() * 0  # in the graph when no anchor is positive: DDP expects every parameter's gradient
    samples = 0
    for b, gt in enumerate(gt_boxes):
        assigned, _ = assigner(anchors, gt.to(anchors.dtype))
        pos, neg = sampler(assigned, generator)
        samples += pos.numel() + neg.numel()
        idx = torch.cat([pos, neg])
        target = torch.cat([cls_logits.new_ones(pos.numel()), cls_logits.new_zeros(neg.numel())])
        cls_sum = cls_sum + F.binary_cross_entropy_with_logits(cls_logits[b, idx], target, reduction="sum")
        if pos.numel():
            t = coder.encode(anchors[pos], gt[assigned[pos] - 1].to(anchors.dtype))
            reg_sum = reg_sum + (deltas[b, pos] - t.to(deltas.dtype)).abs().sum()
    n = max(samples, 1)
    return {"loss_rpn_cls": cls_sum / n, "loss_rpn_bbox": reg_sum / n}


def roi_loss(cls_scores: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, num_classes: int) -> Dict[str, Tensor]:
    """cls_scores [R, C+1], deltas [R, 4C], labels [R] (num_classes: background), targets [R, 4]
    (encoded, used where the label is a class)."""
    R = cls_scores.shape[0]
    loss_cls = F.cross_entropy(cls_scores, labels, reduction="sum") / max(R, 1)
    pos = labels < num_classes
    picked = deltas.reshape(R, -1, 4)[pos, labels[pos]]
    loss_bbox = (picked - targets[pos]).abs().sum() / max(R, 1)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def _check_targets(targets, B: int, num_classes: int) -> None:
    if targets is None or len(targets) != B:
        got = "none" if targets is None else len(targets)
        raise ValueError(f"FasterRCNN: argument 'targets' expected one dict per image ({B}), got {got}")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            got = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(
                f"FasterRCNN: argument 'targets[{i}][\"boxes\"]' expected a tensor [G, 4] (x1, y1, x2, y2), got {got}"
            )
        if not isinstance(labels, Tensor) or labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
            got = f"{list(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"FasterRCNN: argument 'targets[{i}][\"labels\"]' expected int64 [{boxes.shape[0]}], got {got}")
        if not value_checks_enabled(labels):  # the value checks read the data: a host sync on a GPU
            continue
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"FasterRCNN: argument 'targets[{i}][\"labels\"]' expected classes in 0..{num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}"
            )
        if boxes.numel() and bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise ValueError(f"FasterRCNN: argument 'targets[{i}][\"boxes\"]' expected x2 > x1 and y2 > y1 for every box")


class FasterRCNN(nn.Module):
    """forward(images [B, 3, H, W] normalised, H and W multiples of 32; image_sizes [(h, w)] the
    valid part of each; targets: per image {"boxes": [G, 4] xyxy, "labels": [G] in 0..C-1}) ->
    losses (training, with "aux" the backbone's) or per image {"boxes", "scores", "labels"} (eval)."""

    def __init__(self, backbone: nn.Module, config: DetectorConfig = DetectorConfig()):
        super().__init__()
        self.backbone = backbone
        self.config = c = config
        self.neck = FPN(list(backbone.out_channels), c.fpn_channels)  # type: ignore[arg-type]
        self.anchors = AnchorGenerator(c.strides, c.anchor_scales, c.anchor_ratios)
        self.rpn_head = RPNHead(c.fpn_channels, self.anchors.num_anchors)
        self.roi_head = Shared2FCBBoxHead(c.fpn_channels, c.roi_size, c.fc_channels, c.num_classes)
        self.rpn_coder = DeltaXYWHCoder()
        self.roi_coder = DeltaXYWHCoder(stds=c.roi_stds)
        self.generator: Optional[torch.Generator] = None  # the samplers' (None: torch's global one)

    # ---- the two stages ---------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tuple[List[Tensor], Tensor]:
        feats, aux = self.backbone(images)
        if len(feats) != 4:
            raise ValueError(f"FasterRCNN: the backbone returned {len(feats)} feature maps, expected 4 (strides 4, 8, 16, 32)")
        return self.neck(feats), aux

    def proposals(
        self, cls: List[Tensor], reg: List[Tensor], anchors: List[Tensor], image_sizes: Sequence[Tuple[int, int]], train: bool
    ) -> List[Tensor]:
        """Per image [P, 4] proposals, by decreasing objectness (no gradient)."""
        nms_pre, iou, keep_n = self.config.rpn_train if train else self.config.rpn_test
        out = []
        for b, size in enumerate(image_sizes):
            boxes, scores, levels = [], [], []
            for lvl, (c, r, a) in enumerate(zip(cls, reg, anchors)):
                s = c[b].detach().sigmoid()
                if s.numel() > nms_pre:
                    s, top = s.sort(descending=True, stable=True)
                    s, top = s[:nms_pre], top[:nms_pre]
                else:
                    top = torch.arange(s.numel(), device=s.device)
                boxes.append(self.rpn_coder.decode(a[top], r[b].detach()[top], max_shape=size))
                scores.append(s)
                levels.append(torch.full_like(top, lvl))
            bx, sc, lv = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            ok = (bx[:, 2] - bx[:, 0] > 0) & (bx[:, 3] - bx[:, 1] > 0)
            bx, sc, lv = bx[ok], sc[ok], lv[ok]
            kept = nms(bx, sc, iou, lv)[:keep_n]
            out.append(bx[kept])
        return out

    def roi_features(self, feats: List[Tensor], rois: Tensor) -> Tensor:
        """[K, C, 7, 7]: each RoI [K, 5] pooled from its level (the first 4 FPN levels)."""
        c = self.config
        levels = roi_levels(rois, 4, c.finest_scale)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], c.roi_size, c.roi_size)
        for lvl in range(4):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if idx.numel():
                pooled = roi_align(
                    feats[lvl],
                    rois[idx].to(torch.promote_types(feats[lvl].dtype, torch.float32)),  # float32 corners under half maps
                    c.roi_size,
                    1.0 / c.strides[lvl],
                    c.roi_sampling_ratio,
                    c.roi_aligned,
                )
                out = out.index_copy(0, idx, pooled)
        return out

    def forward(
        self,
        images: Tensor,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
    ):
        if images.dim() != 4 or images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(
                f"FasterRCNN: argument 'images' expected [B, 3, H, W] with H and W multiples of 32, got {list(images.shape)}"
            )
        B = images.shape[0]
        sizes = list(image_sizes) if image_sizes is not None else [tuple(images.shape[2:])] * B
        feats, aux = self.features(images)
        cls, reg = self.rpn_head(feats)
        anchors = self.anchors([tuple(f.shape[2:]) for f in feats], images.device, feats[0].dtype)
        if self.training:
            _check_targets(targets, B, self.config.num_classes)
            gts = [t["boxes"] for t in targets]
            losses = rpn_loss(
                torch.cat(anchors), torch.cat(cls, 1), torch.cat(reg, 1), gts,
                self.config.rpn_assigner, self.config.rpn_sampler, self.rpn_coder, self.generator,
            )  # fmt: skip
            props = self.proposals(cls, reg, anchors, sizes, train=True)
            losses.update(self._roi_losses(feats, props, targets))
            losses["aux"] = aux
            return losses
        props = self.proposals(cls, reg, anchors, sizes, train=False)
        return self._detect(feats, props, sizes)

    def roi_targets(self, props: Sequence[Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
        """The RoI head's training samples: (rois [R, 5], labels [R] (num_classes: background),
        encoded targets [R, 4]), each image's positives then negatives."""
        c = self.config
        rois, labels, tgts = [], [], []
        for b, (p, t) in enumerate(zip(props, targets)):
            gt, gl = t["boxes"].to(p.dtype), t["labels"]
            p = torch.cat([gt, p])  # the ground truths join the proposals
            assigned, _ = c.roi_assigner(p, gt)
            assigned[: gt.shape[0]] = torch.arange(1, gt.shape[0] + 1, device=p.device)  # each added gt is its own
            pos, neg = c.roi_sampler(assigned, self.generator)
            idx = torch.cat([pos, neg])
            lab = torch.full((idx.numel(),), c.num_classes, dtype=torch.int64, device=p.device)
            lab[: pos.numel()] = gl[assigned[pos] - 1]
            tg = p.new_zeros(idx.numel(), 4)
            if pos.numel():
                tg[: pos.numel()] = self.roi_coder.encode(p[pos], gt[assigned[pos] - 1])
            rois.append(torch.cat([p.new_full((idx.numel(), 1), b), p[idx]], 1))
            labels.append(lab)
            tgts.append(tg)
        return torch.cat(rois), torch.cat(labels), torch.cat(tgts)

    def _roi_losses(self, feats, props, targets) -> Dict[str, Tensor]:
        rois, labels, tgts = self.roi_targets(props, targets)
        scores, deltas = self.roi_head(self.roi_features(feats, rois))
        return roi_loss(scores, deltas, labels, tgts, self.config.num_classes)

    def _detect(self, feats, props, sizes) -> List[Dict[str, Tensor]]:
        c = self.config
        r = torch.cat([torch.cat([p.new_full((p.shape[0], 1), b), p], 1) for b, p in enumerate(props)])
        scores, deltas = self.roi_head(self.roi_features(feats, r)) if r.numel() else (None, None)
        out, start = [], 0
        for b, p in enumerate(props):
            n = p.shape[0]
            if n == 0 or scores is None:
                out.append(
                    {
                        "boxes": p.new_zeros(0, 4),
                        "scores": p.new_zeros(0),
                        "labels": torch.zeros(0, dtype=torch.int64, device=p.device),
                    }
                )
                continue
            prob = scores[start : start + n].softmax(-1)[:, : c.num_classes]
            boxes = self.roi_coder.decode(p, deltas[start : start + n], max_shape=sizes[b]).reshape(n, c.num_classes, 4)
            start += n
            labels = torch.arange(c.num_classes, device=p.device).expand(n, -1)
            keep = prob > c.score_thr
            bx, sc, lb = boxes[keep], prob[keep], labels[keep]
            kept = nms(bx, sc, c.nms_iou, lb)[: c.max_per_img]
            out.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
        return out
