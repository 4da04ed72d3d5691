"""What a hostile sweep of the data paths found (issue #27), one test per finding: split files
compared as files, validation classes that are not training's, runs with no usable data, the alpha
band of 4-band rasters, raster size limits, malformed band statistics."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from geomoe.data import read_split
from geomoe.finetune import FinetuneArgs, finetune

FT = dict(img_size=32, epochs=1, batch_size=2, progress=False, device="cpu")


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
