"""What a hostile sweep of the data paths found (issue #27), one test per finding: split files
compared as files, validation classes that are not training's, runs with no usable data, the alpha
band of 4-band rasters, raster size limits, malformed band statistics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe.cli import main
from geomoe.data import PROBE_FILES, read_split
from geomoe.finetune import FinetuneArgs, finetune
from geomoe.train import PretrainArgs, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT = dict(img_size=32, epochs=1, batch_size=2, progress=False, device="cpu")
PT = dict(batch_size=2, progress=False, device="cpu", tensorboard=False)


def _png(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _classes(root, names, per_class=2):
    for c, name in enumerate(names):
        for i in range(per_class):
            _png(os.path.join(root, name, f"{i}.png"), 40 + 60 * c + i)


# ---- 3. split files: train and val compared as files ---------------------------------------------


def _split(tmp_path, train, val, categories=None):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": train, "val": val, "categories": categories or {"a": 0, "b": 1}}))
    return str(path)


def test_3_split_compares_resolved_files_refuses_overlaps_and_conflicts_reports_duplicates(tmp_path):
    root = tmp_path / "d"
    _classes(str(root / "x"), ["a", "b"])
    e = lambda image, label: {"image": image, "label": label}
    good_train = [e("x/a/0.png", 0), e("x/b/0.png", 1)]
    # one image in train and in val through an alias: ./, //, an absolute path, a symlink
    os.symlink(root / "x" / "a" / "0.png", root / "link.png")
    for alias in ("x/./a/0.png", "x//a/0.png", str(root / "x" / "a" / "0.png"), "link.png"):
        with pytest.raises(
            ValueError, match=r"argument '--split' expected .*1 images are in both 'train' and 'val' \(compared as files"
        ):
            read_split(_split(tmp_path, good_train, [e(alias, 0), e("x/b/1.png", 1)]), str(root))
    # the same image with two labels, in one part or across the parts (written differently)
    with pytest.raises(
        ValueError,
        match=r"'train'\[0\] 'x/a/0.png' \(label 0, 'a'\) and 'train'\[2\] 'x/./a/0.png' \(label 1, 'b'\) are the same file with two labels",
    ):
        read_split(_split(tmp_path, good_train + [e("x/./a/0.png", 1)], [e("x/b/1.png", 1)]), str(root))
    with pytest.raises(ValueError, match=r"in both 'train' and 'val'"):
        read_split(_split(tmp_path, good_train, [e("x//a/0.png", 1)]), str(root))
    # a duplicate with the same label: reported, kept once
    with pytest.warns(
        UserWarning,
        match=r"1 'val' entries list an image already listed with the same label, kept once; e\.g\. 'val'\[1\] 'x/b//1.png' is 'val'\[0\] 'x/b/1.png'",
    ):
        sp = read_split(_split(tmp_path, good_train, [e("x/b/1.png", 1), e("x/b//1.png", 1), e("x/a/1.png", 0)]), str(root))
    assert [(os.path.realpath(p), y) for p, y in sp.val] == [
        (str(root / "x" / "b" / "1.png"), 1),
        (str(root / "x" / "a" / "1.png"), 0),
    ]
    assert len(sp.train) == 2


# ---- 4. validation classes must be training's ----------------------------------------------------


def test_4_validation_class_folders_other_than_trainings_are_refused(tmp_path):
    for case, val_names, match in (
        ("case", ["A", "b"], r"got 'A', 'b'; only in \S+val: 'A'; missing from \S+val: 'a' \(class names are compared exactly"),
        ("extra", ["a", "b", "zextra"], r"got 'a', 'b', 'zextra'; only in \S+val: 'zextra'"),
    ):
        data = tmp_path / case
        _classes(str(data / "train"), ["a", "b"])
        _classes(str(data / "val"), val_names, per_class=1)
        with pytest.raises(
            ValueError,
            match=r"argument '--data' expected the validation class folders .*val/<class>/ to be the training ones \('a', 'b'\), "
            + match,
        ):
            finetune(FinetuneArgs(data=str(data), out=str(tmp_path / "ft" / case), **FT))
        assert not (tmp_path / "ft" / case / "metrics.jsonl").exists()


# ---- 5. no usable data ---------------------------------------------------------------------------


def test_5_finetune_refuses_one_class_an_empty_class_and_val_labels_training_lacks(tmp_path):
    one = tmp_path / "one"
    _classes(str(one / "train"), ["a"], per_class=4)
    _classes(str(one / "val"), ["a"], per_class=1)
    with pytest.raises(
        ValueError,
        match=r"argument '--data' expected at least 2 classes in \S+train, got 1 \('a'\): with one class the loss is 0",
    ):
        finetune(FinetuneArgs(data=str(one), out=str(tmp_path / "ft1"), **FT))
    empty = tmp_path / "empty"
    _classes(str(empty / "train"), ["a", "b"])
    os.makedirs(empty / "train" / "c")
    _classes(str(empty / "val"), ["a", "b", "c"], per_class=1)
    with pytest.raises(
        ValueError, match=r"argument '--data' expected at least one training image of every class in \S+train, got none of 'c'"
    ):
        finetune(FinetuneArgs(data=str(empty), out=str(tmp_path / "ft2"), **FT))
    # a split whose val has a label no training image has
    root = tmp_path / "d"
    _classes(str(root), ["a", "b", "c"])
    e = lambda image, label: {"image": image, "label": label}
    split = _split(tmp_path, [e("a/0.png", 0), e("b/0.png", 1)], [e("a/1.png", 0), e("c/1.png", 2)], {"a": 0, "b": 1, "c": 2})
    with pytest.raises(
        ValueError,
        match=r"argument '--split' expected at least one training image of every class in \S+split.json 'train', got none of 'c' \(validation images of 'c' could never be predicted right\)",
    ):
        finetune(FinetuneArgs(data=str(root), split=split, out=str(tmp_path / "ft3"), **FT))
    for out in ("ft1", "ft2", "ft3"):
        assert not (tmp_path / out / "metrics.jsonl").exists()


def test_5_pretraining_with_no_readable_file_stops_with_an_error_and_saves_nothing(tmp_path):
    # every file tried at the start (at most PROBE_FILES): refused before the model is built
    few = tmp_path / "few" / "s"
    few.mkdir(parents=True)
    for i in range(3):
        (few / f"{i}.png").write_bytes(b"\x89PNG not an image")
    with pytest.raises(
        ValueError,
        match=r"argument '--data' expected image files that can be read under \S+few/<subfolder>/, got 3 and none can be read, e\.g\. \S+0\.png: ",
    ):
        pretrain(PretrainArgs(data=str(tmp_path / "few"), out=str(tmp_path / "r1"), steps=1, **PT))
    assert not os.path.exists(tmp_path / "r1" / "ckpt_00000001")
    # more files than the start-up check reads: a warning, then the run (shorter than --max-bad-steps)
    # stops with an error instead of saving the untrained model
    many = tmp_path / "many" / "s"
    many.mkdir(parents=True)
    for i in range(PROBE_FILES + 4):
        (many / f"{i:02d}.png").write_bytes(b"\x89PNG not an image")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "geomoe",
            "pretrain",
            "--data",
            str(tmp_path / "many"),
            "--out",
            str(tmp_path / "r2"),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--no-tensorboard",
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"none of the first {PROBE_FILES} of the {PROBE_FILES + 4} files" in proc.stderr
    assert "argument '--data' expected images that can be read, got none among the 4 this run drew from folder" in proc.stderr
    assert "no step trained; stopped at step 2, nothing was saved" in proc.stderr
    assert not os.path.exists(tmp_path / "r2" / "ckpt_00000002")


def test_5_finetuning_with_no_readable_training_image_stops_and_saves_nothing(tmp_path):
    for name, per_class in (("few", 3), ("many", PROBE_FILES // 2 + 1)):
        data = tmp_path / name
        _classes(str(data / "val"), ["a", "b"], per_class=1)
        for c in ("a", "b"):
            os.makedirs(data / "train" / c)
            for i in range(per_class):
                (data / "train" / c / f"{i}.png").write_bytes(b"\x89PNG not an image")
    with pytest.raises(
        ValueError,
        match=r"argument '--data' expected image files that can be read under \S+few/train/<class>/, got 6 and none can be read, e\.g\. \S+a/0\.png: ",
    ):
        finetune(FinetuneArgs(data=str(tmp_path / "few"), out=str(tmp_path / "ft1"), **FT))
    with pytest.warns(UserWarning, match=f"none of the first {PROBE_FILES} of the {PROBE_FILES + 2} files under"):
        with pytest.raises(
            RuntimeError,
            match=r"argument '--data' expected training images that can be read, got none among the 16 this run drew: no step trained; stopped at step 2, nothing was saved",
        ):
            finetune(FinetuneArgs(data=str(tmp_path / "many"), out=str(tmp_path / "ft2"), **dict(FT, batch_size=8)))
    assert not any(n.startswith("ckpt_") for n in os.listdir(tmp_path / "ft2"))


# ---- 6. a band declared alpha ---------------------------------------------------------------------


def _rgba_tif(path, size=32):
    """A 4-band uint8 GeoTIFF written with rasterio's defaults (GDAL marks band 4 alpha); band 4 is
    0 on the left 8 columns, bands 1-3 are 100 + band there and 200 elsewhere."""
    rasterio = pytest.importorskip("rasterio")
    data = np.full((4, size, size), 200, dtype=np.uint8)
    data[:3, :, :8] = (100 + np.arange(3))[:, None, None]
    data[3, :, :8] = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype="uint8") as dst:
        dst.write(data)
    return data


def test_6_a_band_declared_alpha_is_a_mask_by_default_or_a_band_with_alpha_as_data(tmp_path):
    from geomoe.geodata import BandCountError, RasterFolder, band_stats, read_raster

    root = tmp_path / "rgba"
    data = _rgba_tif(str(root / "s" / "0.tif"))
    _rgba_tif(str(root / "s" / "1.tif"))
    # default: band 4 is the declared alpha: not a band, it masks bands 1-3
    values, valid = read_raster(str(root / "s" / "0.tif"))
    assert values.shape == (3, 32, 32) and (values == data[:3]).all()
    assert not valid[:, :, :8].any() and valid[:, :, 8:].all()
    # --alpha-as-data: four bands, nothing masked
    values, valid = read_raster(str(root / "s" / "0.tif"), alpha="data")
    assert values.shape == (4, 32, 32) and (values == data).all() and valid.all()
    # geomoe stats says which rule it used
    proc = subprocess.run(
        [sys.executable, "-m", "geomoe", "stats", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "2 rasters (0 unreadable skipped), 3 bands (band 4 declared alpha in 2 files: read as the no-data mask, not as a band; --alpha-as-data reads it as one)"
        in proc.stdout
    )
    stats = json.load(open(root / "band_stats.json"))
    assert stats["pixels"] == [2 * 32 * 24] * 3 and stats["mean"] == [200.0] * 3 and stats["alpha_bands"] == [4]
    with pytest.raises(
        BandCountError,
        match=r"expected 4 means .* got 3 and 3 in \S+band_stats.json \(written by `geomoe stats` reading the declared alpha band \[4\] as the no-data mask: `geomoe stats --alpha-as-data` and --alpha-as-data here",
    ):
        RasterFolder(str(root), 32, 0, 4, str(root / "band_stats.json"))
    json.dump({"mean": [200.0] * 4, "std": [50.0] * 4}, open(tmp_path / "four.json", "w"))
    with pytest.raises(
        BandCountError,
        match=r"has 3 bands \(band 4 declared alpha: read as the no-data mask, not as a band; --alpha-as-data reads it as one\), expected 4 \(--in-chans\)",
    ):
        RasterFolder(str(root), 32, 0, 4, str(tmp_path / "four.json"))
    stats = band_stats(str(root), str(tmp_path / "as_data.json"), alpha="data")
    assert stats["bands"] == 4 and stats["pixels"] == [2 * 32 * 32] * 4 and stats["alpha"] == "data"
    expect_mean = data.reshape(4, -1).mean(1)
    assert np.allclose(stats["mean"], expect_mean)
    x = RasterFolder(str(root), 32, 0, 4, str(tmp_path / "as_data.json"), alpha="data")[0]
    assert x.shape == (4, 32, 32) and (x != 0).float().mean() > 0.9  # no pixel masked by band 4
    proc = subprocess.run(
        [sys.executable, "-m", "geomoe", "stats", str(root), "--alpha-as-data", "--out", str(tmp_path / "d.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "4 bands (band 4 declared alpha in 2 files: read as a band, --alpha-as-data)" in proc.stdout


# ---- 12. raster size limit and windowed reads -----------------------------------------------------


def _sparse_tif(path, bands, size, dtype="uint16"):
    """A GeoTIFF that declares bands x size x size but stores no block (a few hundred bytes)."""
    rasterio = pytest.importorskip("rasterio")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=dtype, tiled=True, sparse_ok=True)
    with rasterio.open(path, "w", **profile):
        pass
    return path


def test_12_a_raster_over_the_size_limit_is_refused_from_its_header(tmp_path, capsys):
    from geomoe.geodata import RasterFolder, RasterSizeError, band_stats, read_raster

    small = _sparse_tif(str(tmp_path / "small" / "s" / "0.tif"), 4, 1024)
    json.dump({"mean": [0.0] * 4, "std": [1.0] * 4}, open(tmp_path / "small" / "band_stats.json", "w"))
    msg = r"argument '--max-raster-pixels' expected rasters of at most 1,000,000 values \(bands x height x width\), got \S+0\.tif declaring 4 x 1024 x 1024 = 4,194,304 \(0\.0 GiB as uint16\)"
    with pytest.raises(RasterSizeError, match=msg):
        read_raster(small, max_pixels=10**6)
    with pytest.raises(RasterSizeError, match=msg):
        RasterFolder(str(tmp_path / "small"), 32, 0, 4, max_pixels=10**6)
    with pytest.raises(RasterSizeError, match=msg):
        band_stats(str(tmp_path / "small"), max_pixels=10**6)
    # the default limit: a sparse file declaring 4 x 40000 x 40000 uint16 (11.9 GiB) is refused at once
    big = _sparse_tif(str(tmp_path / "big" / "s" / "0.tif"), 4, 40000)
    assert os.path.getsize(big) < 2**20
    json.dump({"mean": [0.0] * 4, "std": [1.0] * 4}, open(tmp_path / "big" / "band_stats.json", "w"))
    with pytest.raises(
        RasterSizeError, match=r"declaring 4 x 40000 x 40000 = 6,400,000,000 \(11\.9 GiB as uint16\): cut it into tiles"
    ):
        pretrain(PretrainArgs(data=str(tmp_path / "big"), in_chans=4, out=str(tmp_path / "r"), steps=1, **PT))
    proc = subprocess.run(
        [sys.executable, "-m", "geomoe", "stats", str(tmp_path / "big")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "geomoe stats: error: argument '--max-raster-pixels' expected" in proc.stderr
    for command in ("pretrain", "finetune"):  # the flag itself is checked like every number
        with pytest.raises(SystemExit) as info:
            main([command, "--max-raster-pixels", "0", "--alpha-as-data", "--out", str(tmp_path / "never")])
        assert (
            info.value.code == 2 and "argument '--max-raster-pixels' expected an integer >= 1, got 0" in capsys.readouterr().err
        )
    assert not (tmp_path / "never").exists()


def test_12_training_crops_read_only_their_window_and_equal_the_full_read(tmp_path, monkeypatch):
    rasterio = pytest.importorskip("rasterio")
    from geomoe import geodata

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (2, 48, 64)).astype(np.uint16)
    data[:, :5, :7] = 0
    os.makedirs(tmp_path / "d" / "s")
    with rasterio.open(
        tmp_path / "d" / "s" / "0.tif", "w", driver="GTiff", width=64, height=48, count=2, dtype="uint16", nodata=0
    ) as dst:
        dst.write(data)
    json.dump({"mean": [2000.0, 1900.0], "std": [1100.0, 1200.0]}, open(tmp_path / "d" / "band_stats.json", "w"))
    windows = []
    opened = geodata._opened

    class Recording:
        def __init__(self, src):
            self.src = src

        def __getattr__(self, name):
            return getattr(self.src, name)

        def read(self, *a, window=None, **kw):
            windows.append(window)
            return self.src.read(*a, window=window, **kw)

    def recording(path):
        cm = opened(path)

        class Wrap:
            def __enter__(self):
                return Recording(cm.__enter__())

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrap()

    monkeypatch.setattr(geodata, "_opened", recording)
    ds = geodata.RasterFolder(str(tmp_path / "d"), 24, 0, 2)
    mean, std = ds.mean, ds.std
    for epoch in range(4):
        windows.clear()
        x = ds[epoch]  # code epoch * len + 0
        full, valid = geodata.read_raster(str(tmp_path / "d" / "s" / "0.tif"))
        want = geodata.raster_transform(full, valid, mean, std, 24, np.random.default_rng([0, epoch, 0, 1]))
        assert torch.equal(x, want)
        w = windows[0]
        box = geodata.random_resized_crop_box(64, 48, np.random.default_rng([0, epoch, 0, 1]))
        assert (w.col_off, w.row_off, w.width, w.height) == (box[0], box[1], box[2] - box[0], box[3] - box[1])
        assert w.width * w.height < 64 * 48 or (w.width, w.height) == (64, 48)


# ---- 15. band statistics -------------------------------------------------------------------------


def test_15_malformed_band_stats_name_the_flag_and_the_file(tmp_path):
    from geomoe.geodata import load_band_stats

    bad = tmp_path / "stats.json"
    bad.write_text('{"mean": [1.0, 2.0], "std": [1.0,')
    with pytest.raises(
        ValueError,
        match=r"argument '--band-stats' expected a JSON file \{\"mean\": \[...\], \"std\": \[...\]\}, got \S+stats\.json: JSONDecodeError: ",
    ):
        load_band_stats(str(bad), 2)
    for std, mean, shown in (
        ([1.0, 1e-30], [0.0, 0.0], "std 1e-30 for band 2 (mean 0.0)"),
        ([0.0, 1.0], [5.0, 0.0], "std 0.0 for band 1 (mean 5.0)"),
        ([1.0, -2.0], [5.0, 0.0], "std -2.0 for band 2"),
        ([1.0, 1e300], [5.0, 0.0], "std 1e+300 for band 2"),
        ([0.001, 1.0], [30000.0, 0.0], "std 0.001 for band 1 (mean 30000.0)"),
    ):
        bad.write_text(json.dumps({"mean": mean, "std": std}))
        with pytest.raises(ValueError) as info:
            load_band_stats(str(bad), 2)
        assert "argument '--band-stats' expected finite standard deviations of at least a millionth of |mean| and 1e-9" in str(
            info.value
        )
        assert shown in str(info.value) and str(bad) in str(info.value)
    bad.write_text(json.dumps({"mean": [30000.0, 0.0], "std": [0.04, 1e-8]}))  # small but meaningful
    mean, std = load_band_stats(str(bad), 2)
    assert std.dtype == np.float32 and np.allclose(std, [0.04, 1e-8])
