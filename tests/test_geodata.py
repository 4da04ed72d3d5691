"""Remote-sensing rasters (python/geomoe/geodata.py): 16-bit multispectral GeoTIFFs train, per-band
statistics from `geomoe stats`, no-data, band-count errors, unreadable files skipped and counted,
the RGB -> multispectral patch-embedding rule, any Dataset of tensors or dicts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from geomoe import GeoMoE
from geomoe.configs import CONFIGS
from geomoe.geodata import BandCountError, RasterFolder, adapt_in_chans, band_stats
from geomoe.train import PretrainArgs, pretrain

rasterio = pytest.importorskip("rasterio")

FAST = dict(steps=3, batch_size=4, log_every=1, progress=False, device="cpu", tensorboard=False)


def _write_tif(path, bands=4, size=112, seed=0, nodata=None):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.stack([1000 + 400 * b + 300 * np.sin(xx / (5 + b)) + 200 * np.cos(yy / 7) for b in range(bands)])
    data = (data + rng.normal(0, 30, data.shape)).clip(0, 65535).astype(np.uint16)
    if nodata is not None:
        data[:, :10, :10] = nodata
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data


def _folder(root, n=8, bands=4, nodata=0):
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        _write_tif(sub / f"{i}.tif", bands, seed=i, nodata=nodata)
    return root


def test_stats_command_and_a_16bit_4band_folder_trains(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "a" / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    proc = subprocess.run([sys.executable, "-m", "geomoe", "stats", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 rasters (1 unreadable skipped), 4 bands" in proc.stdout
    stats = json.load(open(root / "band_stats.json"))
    assert stats["bands"] == 4 and stats["skipped"] == 1
    assert stats["pixels"][0] == 8 * (112 * 112 - 100)  # the no-data corner is left out
    assert 1000 < stats["mean"][0] < stats["mean"][3] and all(s > 0 for s in stats["std"])

    res = pretrain(PretrainArgs(out=str(tmp_path / "run"), data=str(root), in_chans=4, **FAST))
    hist = res["history"]
    assert res["model"].patch_embed1.proj.weight.shape[1] == 4 and res["model"].decoder_pred.out_features == 16 * 16 * 4
    assert all(np.isfinite(r["loss"]) for r in hist)
    assert sum(r["skipped_images"] for r in hist) >= 1  # the broken file is skipped and counted


def test_normalised_and_nodata_is_zero(tmp_path):
    root = _folder(tmp_path / "data", n=2)
    band_stats(str(root))
    ds = RasterFolder(str(root), 96, 0, 4)
    x = ds[0]
    assert x.shape == (4, 96, 96) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.5 and 0.2 < float(x.std()) < 3
    # a raster that is no-data everywhere but one pixel gives zeros (the band means) where no-data
    sub = tmp_path / "holes" / "s"
    sub.mkdir(parents=True)
    data = _write_tif(sub / "h.tif", nodata=0)
    with rasterio.open(sub / "h.tif", "r+") as dst:
        dst.write(np.where(np.arange(112)[None, None, :] < 56, 0, data).astype(np.uint16))
    json.dump({"mean": [1000.0] * 4, "std": [100.0] * 4}, open(tmp_path / "s.json", "w"))
    y = RasterFolder(str(tmp_path / "holes"), 112, 0, 4, str(tmp_path / "s.json"))[0]
    assert (y == 0).float().mean() > 0.3 and torch.isfinite(y).all()


def test_band_count_mismatch_is_an_error(tmp_path):
    root = _folder(tmp_path / "data", n=2, bands=3)
    json.dump({"mean": [0.0] * 4, "std": [1.0] * 4}, open(root / "band_stats.json", "w"))
    with pytest.raises(BandCountError, match=r"has 3 bands, expected 4 \(--in-chans\)"):
        pretrain(PretrainArgs(out=str(tmp_path / "run"), data=str(root), in_chans=4, **FAST))
    with pytest.raises(BandCountError, match="expected 5 means"):
        RasterFolder(str(root), 96, 0, 5)
    with pytest.raises(FileNotFoundError, match="geomoe stats"):
        RasterFolder(str(root), 96, 0, 3, str(tmp_path / "missing.json"))


def test_rgb_patch_embedding_adapted_to_more_bands(tmp_path):
    w = torch.randn(8, 3, 4, 4)
    w4 = adapt_in_chans(w, 4)
    assert w4.shape == (8, 4, 4, 4)
    torch.testing.assert_close(w4[:, 2], w.mean(1) * 3 / 4)
    # a grey image (every band v) gives the same response with 3 bands as with 4
    v = torch.full((1, 3, 4, 4), 0.7)
    torch.testing.assert_close(torch.nn.functional.conv2d(v, w), torch.nn.functional.conv2d(torch.full((1, 4, 4, 4), 0.7), w4))
    assert adapt_in_chans(w, 3) is w
    # --init-weights: an RGB run's checkpoint starts a 4-band run
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rgb = GeoMoE(**CONFIGS["tiny"]["model"])
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "rgb.safetensors"))
    root = _folder(tmp_path / "data", n=4)
    band_stats(str(root))
    res = pretrain(
        PretrainArgs(
            out=str(tmp_path / "run"),
            data=str(root),
            in_chans=4,
            init_weights=str(tmp_path / "rgb.safetensors"),
            **dict(FAST, steps=1, lr=1e-12),
        )
    )
    m = res["model"]
    torch.testing.assert_close(m.patch_embed1.proj.weight, adapt_in_chans(rgb.patch_embed1.proj.weight, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.blocks3[0].mlp.w1, rgb.blocks3[0].mlp.w1, rtol=0, atol=1e-6)


def test_any_dataset_of_tensors_or_dicts(tmp_path):
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise OSError("a tile that cannot be read")
            return {"image": torch.randn(4, 96, 96), "mask": torch.zeros(96, 96)}

    res = pretrain(PretrainArgs(out=str(tmp_path / "run"), dataset=Dicts(), in_chans=4, **dict(FAST, steps=4, batch_size=2)))
    assert all(np.isfinite(r["loss"]) for r in res["history"])
    assert sum(r["skipped_images"] for r in res["history"]) + sum(r["bad_steps"] for r in res["history"]) >= 1
    wrong = [torch.randn(3, 96, 96) for _ in range(4)]
    with pytest.raises(BandCountError, match=r"expected an image tensor of shape \[4, 96, 96\], got \[3, 96, 96\]"):
        pretrain(PretrainArgs(out=str(tmp_path / "r2"), dataset=wrong, in_chans=4, **FAST))
    assert not os.path.exists(tmp_path / "r2" / "ckpt_00000003")


def test_finetune_on_a_raster_class_folder(tmp_path):
    """geomoe finetune takes train/<class>/ and val/<class>/ GeoTIFFs (16-bit, 4 bands) like
    pretraining does: band statistics from `geomoe stats DATA/train`, RGB weights adapted to 4 bands,
    an unreadable file skipped and counted, another band count an error naming the file."""
    from safetensors.torch import save_file

    from geomoe.backbone import GeoMoEBackbone
    from geomoe.finetune import FinetuneArgs, _encoder_config, finetune, load_pretrained
    from geomoe.geodata import RasterClassFolder, load_band_stats

    data = tmp_path / "data"
    _folder(data / "train", n=8)
    _folder(data / "val", n=4)
    (data / "train" / "a" / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    band_stats(str(data / "train"))  # what `geomoe stats DATA/train` writes: DATA/train/band_stats.json
    rgb = GeoMoE(**CONFIGS["tiny"]["model"])
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "rgb.safetensors"))

    args = dict(config="tiny", data=str(data), in_chans=4, epochs=1, batch_size=4, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="skipping unreadable raster .*broken.tif"):
        res = finetune(FinetuneArgs(out=str(tmp_path / "ft"), weights=str(tmp_path / "rgb.safetensors"), **args))
    model = res["model"]
    assert model.backbone.patch_embed1.proj.weight.shape[1] == 4 and model.head.out_features == 2
    assert all(np.isfinite(r["val_loss"]) for r in res["history"]) and 0 <= res["top1"] <= 100
    assert sum(r["skipped_images"] for r in res["history"]) == 1  # seeded: the broken file is among the epoch's 8 of 9, read once

    # the adaptation rule on the RGB weights: every band the mean RGB kernel x 3/4
    backbone = GeoMoEBackbone(**_encoder_config(FinetuneArgs(config="tiny")), in_chans=4)
    note = load_pretrained(backbone, str(tmp_path / "rgb.safetensors"))
    assert "patch_embed1.proj.weight: 3 -> 4 bands" in note
    torch.testing.assert_close(backbone.patch_embed1.proj.weight, adapt_in_chans(rgb.patch_embed1.proj.weight.detach(), 4))

    stats = load_band_stats(str(data / "train" / "band_stats.json"), 4)
    three = RasterClassFolder(str(data / "val"), 96, False, 3, (stats[0][:3], stats[1][:3]))
    with pytest.raises(BandCountError, match=r"raster .*\.tif has 4 bands, expected 3 \(--in-chans\)"):
        three[0]
