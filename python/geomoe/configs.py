"""Presets: `base` is the published model and recipe (docs/model.md, docs/recipe.md); `tiny` is a small
model with the same structure that trains on a CPU in minutes. Each preset has a GeoMoE (`model`) and a
MoE-ViT (`moevit`: the plain-ViT baseline, pretrained on GeoMoE's objective by assumption) of that
size; `geomoe pretrain --model` picks one.

The published models' shapes are written here once (`GEOMOE_BASE`, `MOEVIT_BASE`, `DECODER_BASE`): the
constructors' defaults (model.GeoMoE, backbone.GeoMoEBackbone, moevit_encoder.MoEViTEncoder,
moevit.MoEViTMAE) and the `base` preset read them."""

from typing import Any, Dict

MODELS = ("geomoe", "moevit")
"""--model: GeoMoE, or MoE-ViT (the plain-ViT MoE baseline)."""

BASE_EXPERTS = 23
"""Routed experts of every MoE layer of the published models (plus 1 shared expert, top-3)."""

_BASE_MOE = dict(mlp_ratio=4.0, moe_mlp_ratio=0.75, num_experts=BASE_EXPERTS, num_shared_experts=1, top_k=3)

GEOMOE_BASE: Dict[str, Any] = dict(img_size=224, embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12, **_BASE_MOE)
"""The published GeoMoE encoder (docs/model.md): three stages, the last 11 blocks MoE."""

MOEVIT_BASE: Dict[str, Any] = dict(img_size=224, embed_dim=768, depth=12, num_heads=12, **_BASE_MOE)
"""The published MoE-ViT encoder: 12 blocks of width 768, block 0 dense, 1-11 MoE."""

DECODER_BASE: Dict[str, Any] = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
"""The MAE decoder of both models' pretraining."""

CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny": {
        "model": dict(
            img_size=96,
            embed_dim=(32, 64, 128),
            depth=(1, 1, 2),
            num_heads=4,
            num_experts=8,
            num_shared_experts=1,
            top_k=2,
            decoder_embed_dim=64,
            decoder_depth=1,
            decoder_num_heads=4,
        ),
        "moevit": dict(
            img_size=96,
            embed_dim=128,
            depth=3,
            num_heads=4,
            num_experts=8,
            num_shared_experts=1,
            top_k=2,
            decoder_embed_dim=64,
            decoder_depth=1,
            decoder_num_heads=4,
        ),
        "batch_size": 64,
        "steps": 300,
        "lr": 2e-3,
        "warmup_fraction": 0.1,
        "dataset_length": 2048,
    },
    "base": {
        "model": dict(GEOMOE_BASE, **DECODER_BASE),
        "moevit": dict(MOEVIT_BASE, **DECODER_BASE),
        "batch_size": 320,
        "steps": 400 * (4_000_000 // 2560),
        # peak lr = 1.5e-4 * (0.25 / 0.75) * global batch / 256 (5e-4 at 2560)
        "base_lr": 1.5e-4 * (0.25 / 0.75),
        "warmup_fraction": 10 / 400,
        "dataset_length": 4096,
    },
}

RECIPE = dict(
    mask_ratio=0.75,
    kept_mask_ratio=0.25,
    betas=(0.9, 0.95),
    weight_decay=0.05,
    clip_grad=1.0,
    aux_weight=1e-4,
    bias_rate=1e-3,
    min_lr_ratio=1e-3,
)
