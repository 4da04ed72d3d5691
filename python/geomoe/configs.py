"""Presets: `base` is the published model and recipe (docs/model.md, docs/recipe.md); `tiny` is a small
model with the same structure that trains on a CPU in minutes. Each preset has a GeoMoE (`model`) and a
MoE-ViT (`moevit`: the plain-ViT baseline, pretrained on GeoMoE's objective by assumption) of that
size; `geomoe pretrain --model` picks one."""

from typing import Any, Dict

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
        "model": {},
        "moevit": {},
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
