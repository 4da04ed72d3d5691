"""Horizontal-box object detection: the published Faster R-CNN with FPN (DIOR config) on
geomoe_kernels' nms and roi_align, and COCO evaluation."""

from .boxes import AnchorGenerator, DeltaXYWHCoder, MaxIoUAssigner, RandomSampler, roi_levels
from .faster_rcnn import FPN, Backbone, DetectorConfig, FasterRCNN, RPNHead, Shared2FCBBoxHead, roi_loss, rpn_loss

__all__ = [
    "AnchorGenerator",
    "Backbone",
    "DeltaXYWHCoder",
    "DetectorConfig",
    "FPN",
    "FasterRCNN",
    "MaxIoUAssigner",
    "RPNHead",
    "RandomSampler",
    "Shared2FCBBoxHead",
    "roi_levels",
    "roi_loss",
    "rpn_loss",
]
