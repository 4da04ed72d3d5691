"""The published layer-wise lr decay ids of both models, and the groups built from them."""

import torch

from geomoe import GeoMoEBackbone, GeoMoEClassifier, MoEViTClassifier
from geomoe.layer_decay import layer_id, num_layers, param_groups

SMALL_VIT = dict(embed_dim=64, num_heads=4, num_experts=5, top_k=2)


def test_geomoe_ids_follow_the_published_table():
    model = GeoMoEClassifier(GeoMoEBackbone(), 10)
    assert num_layers(model) == 20
    want = {
        "backbone.patch_embed1.proj.weight": 0,
        "backbone.blocks1.0.conv1.weight": 1,
        "backbone.blocks1.1.mlp.fc2.bias": 2,
        "backbone.patch_embed2.norm.weight": 3,
        "backbone.blocks2.0.attn.weight": 4,
        "backbone.blocks2.1.norm2.bias": 5,
        "backbone.patch_embed3.proj.bias": 6,
        "backbone.patch_embed4.weight": 7,
        "backbone.blocks3.0.attn.qkv.weight": 8,
        "backbone.blocks3.10.mlp.w1": 18,
        "fc_norm.weight": 19,
        "head.bias": 19,
    }
    names = dict(model.named_parameters())
    for name, lid in want.items():
        assert name in names, name
        assert layer_id(name, model) == lid, name


def test_moevit_ids_follow_the_published_table():
    model = MoEViTClassifier(10, 32, **SMALL_VIT)
    assert num_layers(model) == 13
    want = {
        "patch_embed.proj.weight": 0,
        "cls_token": 0,
        "blocks.0.mlp.fc1.weight": 1,
        "blocks.5.norm1.weight": 6,
        "blocks.11.mlp.w2": 12,
        "fc_norm.bias": 12,
        "head.weight": 12,
    }
    for name, lid in want.items():
        assert layer_id(name, model) == lid, name


def test_groups_scale_lr_and_skip_decay_on_one_dimensional_parameters():
    model = MoEViTClassifier(10, 32, **SMALL_VIT)
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.85)
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for g in groups:
        assert abs(g["lr"] - 1e-3 * 0.85 ** (12 - g["layer_id"])) < 1e-15
        # one-dimensional in the original layout: biases, norms, and each expert's own bias vectors
        # (stacked here as [E, hidden])
        for n, p in zip(g["names"], g["params"]):
            expert_bias = n.rsplit(".", 1)[-1] in ("b1", "b2", "shared_b1", "shared_b2")
            assert (p.ndim > 1 and not expert_bias) == (g["weight_decay"] == 0.05), n
    torch.optim.AdamW(groups)  # the groups are what AdamW takes (extra keys are kept, not rejected)
