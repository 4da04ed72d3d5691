import pytest
import torch
from safetensors.torch import save_file

from geomoe import GeoMoE, load_original_state_dict, original_state_dict
from tests.test_model import TINY

DECODER_ONLY_PREFIXES = ("decoder", "stage1_output_decode", "stage2_output_decode", "norm.", "mask_token")


def test_original_keys_follow_the_published_layout():
    sd = original_state_dict(GeoMoE())
    assert sum(v.numel() for v in sd.values()) == 298_917_757 + 11 * 23  # + the bias buffers
    assert sd["blocks3.4.mlp.unique_experts.22.fc1.weight"].shape == (576, 768)
    assert sd["blocks3.4.mlp.unique_experts.22.fc2.weight"].shape == (768, 576)
    assert sd["blocks3.0.mlp.share_experts.fc1.bias"].shape == (576,)
    assert sd["blocks3.10.mlp.bias"].shape == (23,)
    assert sd["blocks1.1.attn.weight"].shape == (256, 1, 5, 5)
    assert sd["blocks2.0.mlp.fc1.weight"].shape == (1536, 384, 1, 1)
    assert sd["decoder_blocks.7.cross_attn.kv.weight"].shape == (1024, 768)
    assert sd["pos_embed"].shape == (1, 196, 768) and sd["decoder_pos_embed"].shape == (1, 196, 512)
    assert not any(".w1" in k or "expert_bias" in k for k in sd)


def test_round_trip_is_exact():
    a, b = GeoMoE(**TINY), GeoMoE(**TINY)
    for moe in a.moe_layers():
        moe.expert_bias.normal_()
    res = load_original_state_dict(b, original_state_dict(a), strict=True)
    assert res.missing == [] and res.unexpected == []
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    assert torch.equal(a(imgs, noise=noise)[0], b(imgs, noise=noise)[0])


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "dict"])
def test_encoder_only_file(tmp_path, wrapper, fmt):
    src = GeoMoE(**TINY)
    enc = {k: v for k, v in original_state_dict(src).items() if not k.startswith(DECODER_ONLY_PREFIXES)}
    enc = {"module." + k: v for k, v in enc.items()} if fmt == "pt" else enc  # a DDP-saved file
    if fmt == "safetensors":
        path = tmp_path / "enc.safetensors"
        save_file(enc, str(path))
        source = path
    else:
        obj = enc if wrapper is None else {wrapper: enc, "epoch": torch.tensor(3)}
        path = tmp_path / "enc.pt"
        torch.save(obj, path)
        source = path if fmt == "pt" else obj
    dst = GeoMoE(**TINY)
    res = load_original_state_dict(dst, source)
    assert res.unexpected == []
    assert res.missing and all(k.startswith(DECODER_ONLY_PREFIXES) for k in res.missing)
    assert "decoder_pred.weight" in res.missing and "stage1_output_decode.weight" in res.missing
    keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    imgs = torch.randn(2, 3, 64, 64)
    # the encoder without its fusion (norm and stage decodes are not in the released file) matches
    src.stage1_output_decode.load_state_dict(dst.stage1_output_decode.state_dict())
    src.stage2_output_decode.load_state_dict(dst.stage2_output_decode.state_dict())
    src.norm.load_state_dict(dst.norm.state_dict())
    assert torch.equal(src.forward_encoder(imgs, keep)[0], dst.forward_encoder(imgs, keep)[0])


def test_mismatches_are_named():
    sd = original_state_dict(GeoMoE(**TINY))
    sd["surprise.weight"] = torch.zeros(1)
    del sd["blocks3.1.mlp.unique_experts.3.fc2.bias"]
    res = load_original_state_dict(GeoMoE(**TINY), sd)
    assert res.unexpected == ["surprise.weight"]
    assert res.missing == ["blocks3.1.mlp.unique_experts.3.fc2.bias"]
    with pytest.raises(ValueError, match="surprise.weight"):
        load_original_state_dict(GeoMoE(**TINY), sd, strict=True)
    sd = original_state_dict(GeoMoE(**TINY))
    sd["blocks3.0.mlp.unique_experts.0.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"blocks3.0.mlp.unique_experts.0.fc1.weight.*expected shape"):
        load_original_state_dict(GeoMoE(**TINY), sd)


def test_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_original_state_dict(GeoMoE(**TINY), path)
