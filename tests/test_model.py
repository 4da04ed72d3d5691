import pytest
import torch

from geomoe import GeoMoE, random_masking
from tests.helpers import TOL

TINY = dict(
    img_size=64,
    embed_dim=(8, 12, 16),
    depth=(2, 1, 2),
    num_heads=2,
    num_experts=5,
    top_k=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def test_published_parameter_count():
    assert sum(p.numel() for p in GeoMoE().parameters()) == 298_917_757


def _loss_and_grads(model, imgs, noise, mask_ratio):
    model.zero_grad()
    loss, aux, load = model(imgs, mask_ratio=mask_ratio, noise=noise)
    (loss + 1e-4 * aux.sum()).backward()
    return loss.detach(), load, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("img_size,mask_ratio", [(64, 0.75), (80, 0.6), (64, 0.85), (48, 0.6)])
def test_sparse_front_end_equals_dense_in_float64(img_size, mask_ratio):
    cfg = dict(TINY, img_size=img_size)
    sparse = GeoMoE(**cfg, front_end="sparse").double()
    dense = GeoMoE(**cfg, front_end="dense").double()
    dense.load_state_dict(sparse.state_dict())
    L = (img_size // 16) ** 2
    for trial in range(2):
        imgs = torch.randn(3, 3, img_size, img_size, dtype=torch.float64)
        noise = torch.rand(3, L)
        ls, load_s, gs = _loss_and_grads(sparse, imgs, noise, mask_ratio)
        ld, load_d, gd = _loss_and_grads(dense, imgs, noise, mask_ratio)
        assert torch.equal(load_s, load_d)
        assert abs(float(ls - ld)) <= 1e-10 * abs(float(ld))
        assert gs.keys() == gd.keys() and len(gs) > 50
        for name in gd:
            # A gradient that is zero in exact arithmetic (one kept token makes cross-attention's
            # softmax constant, so q gets none) is rounding noise of ~1e-19 on both paths: the norm
            # is floored at 1e-8, far below any real gradient here.
            err = (gs[name] - gd[name]).norm() / gd[name].norm().clamp_min(1e-8)
            assert err <= 1e-10, (name, float(err))


def test_masked_pixels_never_reach_the_sparse_encoder():
    model = GeoMoE(**TINY).double().eval()
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    keep = random_masking(2, 16, 0.75, 0.25).keep
    latent, _, _ = model.forward_encoder(imgs, keep)
    vis = torch.zeros(2, 16, dtype=torch.bool)
    vis.scatter_(1, keep, True)
    pix = vis.view(2, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3).expand_as(imgs)
    perturbed = torch.where(pix, imgs, imgs + 1e3)
    assert torch.equal(model.forward_encoder(perturbed, keep)[0], latent)
    poisoned = torch.where(pix, imgs, torch.full_like(imgs, float("inf")))
    assert torch.equal(model.forward_encoder(poisoned, keep)[0], latent)


def test_no_mask_runs_every_token():
    model = GeoMoE(**TINY)
    latent, aux, load = model.forward_encoder(torch.randn(2, 3, 64, 64), None)
    assert latent.shape == (2, 16, 16) and aux.shape == (2,) and load.shape == (2, 5)
    assert load.sum(1).tolist() == [2 * 16 * 2] * 2


def test_forward_outputs_like_the_original():
    model = GeoMoE(**TINY)
    loss, aux, load = model(torch.randn(4, 3, 64, 64))
    assert loss.dim() == 0 and aux.shape == (2,) and load.shape == (2, 5) and load.dtype == torch.int64
    assert load.sum(1).tolist() == [4 * 4 * 2] * 2  # 4 images x 4 visible tokens x top-2


def test_masking_follows_the_noise():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]])
    m = random_masking(1, 8, 0.75, 0.25, noise)
    assert m.keep.tolist() == [[1, 5]]  # first 2 of argsort, in shuffle order
    assert m.build.tolist() == [[2, 6]]  # last 2 of argsort, ascending


def test_norm_pix_target_and_patch_order():
    model = GeoMoE(**TINY)
    imgs = torch.arange(3 * 32 * 32, dtype=torch.float64).view(1, 3, 32, 32)
    p = model.patchify(imgs)
    # patch (0, 1), pixel (0, 1), channel 2
    assert p[0, 1, (0 * 16 + 1) * 3 + 2] == imgs[0, 2, 0, 17]


def test_bias_update_moves_towards_balance():
    model = GeoMoE(**TINY)
    loads = torch.tensor([[10, 0, 0, 0, 0], [2, 2, 2, 2, 2]])
    model.update_expert_biases(loads)
    assert model.blocks3[0].mlp.expert_bias.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert model.blocks3[1].mlp.expert_bias.tolist() == [0.0] * 5


def test_bias_update_bad_loads_are_errors_before_any_bias_moves():
    model = GeoMoE(**TINY)
    with pytest.raises(
        ValueError,
        match=r"GeoMoE.update_expert_biases: argument 'loads' expected shape \[2, experts\] \(one row per MoE layer\), got shape \[1, 5\]",
    ):
        model.update_expert_biases(torch.tensor([[10, 0, 0, 0, 0]]))  # zip used to drop the second layer
    with pytest.raises(ValueError, match=r"argument 'loads\[0\]' expected shape \[5\] \(one value per expert\), got shape \[4\]"):
        model.update_expert_biases(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"argument 'loads\[1\]' expected finite values, got loads\[1\]\[2\] = nan"):
        model.update_expert_biases(torch.tensor([[10.0, 0, 0, 0, 0], [2, 2, float("nan"), 2, 2]]))
    assert model.blocks3[0].mlp.expert_bias.tolist() == [0.0] * 5  # layer 0 checked fine, not moved either


def test_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        GeoMoE(img_size=100)
    with pytest.raises(ValueError, match="front_end"):
        GeoMoE(**TINY, front_end="fast")
    model = GeoMoE(**TINY)
    with pytest.raises(ValueError, match="imgs"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 15))


def test_mixed_precision_runs_and_keeps_router_in_float32():
    """bf16 autocast against the same model in float64: the loss (a mean over every masked pixel)
    within 1e-3 relative (measured: 2e-5), every gradient together within 5 % in norm (measured:
    1.3 %), which a bf16 rounding of each layer's output allows and a wrong layer does not."""
    model = GeoMoE(**TINY)
    m64 = GeoMoE(**TINY).double()
    m64.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    ref = m64(imgs.double(), noise=noise.double())[0]
    ref.backward()
    ref_grads = {n: p.grad for n, p in m64.named_parameters() if p.grad is not None}
    for front_end in ("sparse", "dense"):
        model.front_end = front_end
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, aux, load = model(imgs, noise=noise)
        loss.backward()
        assert aux.dtype == torch.float32 and load.dtype == torch.int64
        assert abs(float(loss.detach()) - float(ref)) < 1e-3 * abs(float(ref)), (float(loss), float(ref))
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == set(ref_grads)
        got = torch.cat([grads[n].double().flatten() for n in ref_grads])
        want = torch.cat([g.flatten() for g in ref_grads.values()])
        assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 5e-2
        model.zero_grad()


def test_sparse_front_end_keeps_a_third_of_the_dense_ones_activations():
    """Issue goal: stage 1-2 activation memory at least 3x smaller at mask 0.75 (default widths;
    what autograd keeps for backward, parameters not counted)."""
    from tests.saved_bytes import bytes_saved_for_backward

    torch.manual_seed(0)
    model = GeoMoE()
    imgs = torch.randn(2, 3, model.img_size, model.img_size)
    keep = random_masking(2, model.grid**2, 0.75, 0.25).keep
    sparse = bytes_saved_for_backward(lambda: model._front_end_sparse(imgs, keep), model.parameters())
    dense = bytes_saved_for_backward(lambda: model._front_end_dense(imgs, keep), model.parameters())
    assert dense >= 3 * sparse, (dense, sparse)


def test_loss_and_gradients_with_kernel_backends(kernel_backend):
    """backend "auto": the kernel backend wherever it has a kernel (Triton under the interpreter)."""
    if kernel_backend.device.type == "cuda":
        pytest.skip("on a GPU tests/test_gpu.py runs the model's front ends against each other")
    cfg = dict(
        img_size=32,
        embed_dim=(8, 8, 16),
        depth=(1, 1, 1),
        num_heads=2,
        num_experts=4,
        top_k=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    runs = []
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        model = GeoMoE(**cfg, backend=backend)
        loss, aux, load = model(imgs, mask_ratio=0.5, kept_mask_ratio=0.5, noise=noise)
        (loss + 1e-4 * aux.sum()).backward()
        runs.append((loss.detach(), load, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(runs[0][0], runs[1][0], **TOL[torch.float32])
    assert torch.equal(runs[0][1], runs[1][1])
    for name, g in runs[1][2].items():
        torch.testing.assert_close(runs[0][2][name], g, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
