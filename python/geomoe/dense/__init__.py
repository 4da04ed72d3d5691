"""Dense prediction on both pretrained encoders: the published backbones for segmentation and
detection (backbones), UPerHead (uperhead), segmentation data (segdata), metrics (metrics) and the
`geomoe segment` run (segment). docs/segmentation.md has the formats and the published recipe."""

from .backbones import (  # noqa: F401
    AUX_WEIGHT,
    DenseGeoMoE,
    DenseMoEViT,
    WeightsReport,
    build_backbone,
    check_dense_input,
    dense_layer_id,
    dense_param_groups,
    load_backbone_weights,
)
