"""The MoE-ViT (the published plain-ViT baseline): parameter count, the published classification
computation in float64 through the original key layout, loads, the dense-prediction pyramid."""

import pytest
import torch

from geomoe import MoEViTBackbone, MoEViTClassifier, MoEViTEncoder, load_original_state_dict, original_state_dict
from tests.oracles import OriginalMoEViT

SMALL = dict(embed_dim=64, depth=4, num_heads=4, num_experts=5, top_k=2)


def test_encoder_has_the_published_parameter_count():
    assert sum(p.numel() for p in MoEViTEncoder().parameters()) == 267_818_749


def _pair(img_size=32):
    torch.manual_seed(0)
    orig = OriginalMoEViT(7, img_size, dim=64, depth=4, heads=4, hidden=48, experts=5, top_k=2).double()
    ours = MoEViTClassifier(7, img_size, drop_path_rate=0.0, moe_mlp_ratio=0.75, **SMALL).double()
    result = load_original_state_dict(ours, orig.state_dict(), strict=True)
    assert result.missing == [] and result.unexpected == []
    return orig, ours


def test_logits_aux_and_every_gradient_match_the_published_computation_float64():
    orig, ours = _pair()
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    (la, aa), (lb, ab) = orig(imgs), ours(imgs)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-12)
    torch.testing.assert_close(ab, aa, rtol=0, atol=1e-12)
    g = torch.randn_like(la)
    ((la * g).sum() + aa.sum()).backward()
    ((lb * g).sum() + ab.sum()).backward()
    got = original_state_dict(_grads_as_params(ours))
    for k, p in orig.named_parameters():
        if p.requires_grad:  # an expert the loop never ran has no gradient: ours is exactly zero
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-10, msg=k)


def _grads_as_params(model):
    """A copy of the model whose parameters hold its gradients (to map them to original keys)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q.grad if q.grad is not None else torch.zeros_like(q))
    return twin


def test_round_trip_and_encoder_only_file():
    _, ours = _pair()
    sd = original_state_dict(ours)
    assert "pos_embed" not in sd and "blocks.1.mlp.unique_experts.4.fc2.weight" in sd and "blocks.0.mlp.fc1.weight" in sd
    fresh = MoEViTClassifier(7, 32, **SMALL).double()
    load_original_state_dict(fresh, sd, strict=True)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(imgs)[0], ours.eval()(imgs)[0], rtol=0, atol=0)
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("fc_norm", "head"))}
    encoder_only["pos_embed"] = torch.zeros(1, 5, 64)  # a table of another size in the file is not read
    result = load_original_state_dict(MoEViTClassifier(7, 32, **SMALL).double(), {"model": encoder_only})
    assert sorted(result.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and result.unexpected == []


def test_drop_path_is_active_in_training_only_and_rises_linearly():
    m = MoEViTClassifier(3, 32, drop_path_rate=0.3, **SMALL)
    assert [round(b.drop_path.p, 6) for b in m.blocks] == [0.0, 0.1, 0.2, 0.3]
    imgs = torch.randn(4, 3, 32, 32)
    m.eval()
    assert torch.equal(m(imgs)[0], m(imgs)[0])
    m.train()
    torch.manual_seed(1)
    a = m(imgs)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, m(imgs)[0])


@pytest.mark.parametrize("size", [224, 320, 800])
def test_backbone_pyramid_at_any_multiple_of_16(size):
    bb = MoEViTBackbone(224, out_indices=(0, 1, 2, 3), drop_path_rate=0.1, **SMALL).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, size, size))
    g = size // 16
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 4 * g, 4 * g),
        (1, 64, 2 * g, 2 * g),
        (1, 64, g, g),
        (1, 64, g // 2, g // 2),
    ]
    assert [f["reduction"] for f in bb.feature_info] == [4, 8, 16, 32] and all(f["num_chs"] == 64 for f in bb.feature_info)
    assert bb.aux_loss is not None and bb.aux_loss.dim() == 0
    assert all(not b.requires_grad for m in bb.moe_layers() for b in m.buffers())


def test_mae_pretraining_loss_falls_and_its_encoder_loads_into_the_classifier():
    from geomoe import MoEViTMAE

    torch.manual_seed(0)
    mae = MoEViTMAE(32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **SMALL)
    # smooth images: a masked patch is predictable from the visible one (noise would not be)
    imgs = torch.nn.functional.interpolate(torch.randn(8, 3, 2, 2), size=(32, 32), mode="bilinear", align_corners=True)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss, aux, load = mae(imgs, noise=torch.rand(8, 4, generator=torch.Generator().manual_seed(step)))
        assert aux.shape == (3,) and load.shape == (3, 5) and int(load.sum()) == 3 * 8 * 2 * 2  # cls + 1 kept token, top-2
        opt.zero_grad()
        (loss + 1e-4 * aux.sum()).backward()
        opt.step()
        mae.update_expert_biases(load)
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    clf = MoEViTClassifier(4, 32, **SMALL)
    result = load_original_state_dict(clf, original_state_dict(mae))
    assert sorted(result.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert all(k.startswith(("norm.", "mask_token", "decoder")) for k in result.unexpected)
