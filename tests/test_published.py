"""A checkpoint of the published computation loads into GeoMoE and gives the same loss and the same
gradients (the contract of docs/checkpoints.md), on both front ends."""

import pytest
import torch

from benchmarks.published_geomoe import PublishedGeoMoE
from geomoe import GeoMoE, load_original_state_dict
from geomoe.original import key_map

CFG = dict(
    img_size=64,
    embed_dim=(8, 12, 16),
    depth=(1, 1, 2),
    num_heads=2,
    num_experts=5,
    top_k=2,
    decoder_embed_dim=16,
    decoder_depth=2,
    decoder_num_heads=2,
)


def test_published_state_dict_has_the_original_keys():
    ours = set(key_map(GeoMoE()).keys())
    assert set(PublishedGeoMoE().state_dict().keys()) == ours


@pytest.mark.parametrize("front_end", ["sparse", "dense"])
def test_same_loss_and_gradients_as_published(front_end):
    torch.manual_seed(0)
    pub = PublishedGeoMoE(**CFG).double()
    with torch.no_grad():
        for p in pub.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # no zero biases: every term counts
        for blk in pub.blocks3:
            blk.mlp.bias.normal_(0, 0.05)
    ours = GeoMoE(**CFG, front_end=front_end).double()
    res = load_original_state_dict(ours, pub.state_dict(), strict=True)
    assert not res.missing and not res.unexpected
    imgs = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    noise = torch.rand(3, 16)
    lp, ap, loadp = pub(imgs, noise=noise)
    lo, ao, loado = ours(imgs, noise=noise)
    assert torch.equal(loadp, loado)
    torch.testing.assert_close(lo, lp, rtol=1e-12, atol=0)
    torch.testing.assert_close(ao, ap, rtol=1e-12, atol=0)
    (lp + 1e-4 * ap.sum()).backward()
    (lo + 1e-4 * ao.sum()).backward()
    pub_grads = {k: p.grad for k, p in pub.named_parameters()}
    our_grads = {k: p.grad for k, p in ours.named_parameters()}
    checked = 0
    for orig, (key, idx, transposed) in key_map(ours).items():
        if orig not in pub_grads or pub_grads[orig] is None:
            continue
        g = our_grads[key] if idx is None else our_grads[key][idx]
        g = g.t() if transposed else g
        want = pub_grads[orig]
        err = (g - want).norm() / want.norm().clamp_min(1e-8)
        assert err <= 1e-10, (orig, float(err))
        checked += 1
    assert checked > 100
