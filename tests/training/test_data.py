"""The GlaS reader, the deterministic stratified splits and the generic folder-per-class layout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data import DatasetError, load_folder_dataset, load_glas, load_sample, make_splits


@pytest.fixture(scope="module")
def glas_records(glas_dir: Path):
    return load_glas(glas_dir)


def test_glas_records(glas_records) -> None:
    train = [r for r in glas_records if r.subset == "train"]
    test = [r for r in glas_records if r.subset == "test"]
    assert len(train) == 85 and len(test) == 77
    assert {r.label for r in train} == {0, 1}
    assert all(r.mask_path is not None and r.image_path.is_file() for r in glas_records)


def test_splits_deterministic_disjoint_stratified(glas_records) -> None:
    a = make_splits(glas_records, seed=0)
    assert a == make_splits(glas_records, seed=0)
    assert a != make_splits(glas_records, seed=1)
    train, valcl, valpx, test = (set(a[k]) for k in ("train", "valcl", "valpx", "test"))
    assert not (train & valcl) and not (train & test) and not (valcl & test)
    assert valpx <= valcl
    assert len(train) + len(valcl) == 85 and len(test) == 77
    assert 16 <= len(valcl) <= 18
    label = {r.name: r.label for r in glas_records}
    assert sorted(label[n] for n in valpx) == [0, 0, 0, 1, 1, 1]
    assert {label[n] for n in valcl} == {0, 1}
    assert all(n.startswith(("testA_", "testB_")) for n in test)


def test_resampled_to_input_mpp(glas_records) -> None:
    rec = next(r for r in glas_records if r.name == "train_1")
    sample = load_sample(rec, scale=0.62005)
    h, w = sample.image.shape[:2]
    assert sample.image.dtype == np.uint8 and sample.mask is not None and sample.mask.shape == (h, w)
    assert (w, h) == (round(775 * 0.62005), round(522 * 0.62005))
    assert 0.05 < sample.mask.mean() < 0.95


def test_folder_dataset(tmp_path: Path) -> None:
    img = np.full((40, 50, 3), 200, np.uint8)
    for subset in ("train", "test"):
        for cls in ("normal", "tumor"):
            (tmp_path / subset / cls).mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(tmp_path / subset / cls / f"{subset}{i}.png"), img)
    (tmp_path / "masks" / "tumor").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "masks" / "tumor" / "train0.png"), np.zeros((40, 50), np.uint8))
    records = load_folder_dataset(tmp_path, ("normal", "tumor"))
    assert len(records) == 12
    masked = [r for r in records if r.mask_path is not None]
    assert [r.name for r in masked] == ["train/tumor/train0"] and masked[0].label == 1
    splits = make_splits(records, seed=0, valcl_frac=0.34, valpx_per_class=1)
    assert len(splits["test"]) == 6 and splits["valpx"] == ["train/tumor/train0"]
    with pytest.raises(DatasetError, match="root/train/<class>"):
        load_folder_dataset(tmp_path, ("a", "b"))


def test_folder_dataset_trains_through_the_recipe(tmp_path: Path) -> None:
    from training.run import main

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for subset in ("train", "test"):
        for cls in ("normal", "tumor"):
            (root / subset / cls).mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(root / subset / cls / f"{subset}{i}.png"), rng.integers(0, 256, (80, 96, 3), np.uint8))
    (root / "masks" / "tumor").mkdir(parents=True)
    for subset in ("train", "test"):
        for i in range(4):
            mask = np.zeros((80, 96), np.uint8)
            mask[20:60, 30:70] = 255
            cv2.imwrite(str(root / "masks" / "tumor" / f"{subset}{i}.png"), mask)
    run = tmp_path / "run"
    args = ["--quick", "--dataset", "folder", "--data-dir", str(root), "--class-names", "normal", "tumor",
            "--positive-class", "tumor", "--foreground-name", "Tumor", "--source-mpp", "2.5", "--run-dir", str(run)]
    assert main([*args, "--stage", "baseline"]) == 0
    assert main([*args, "--stage", "cams"]) == 0
    with np.load(run / "cams" / "cams.npz") as cams:
        assert len(cams.files) == len(json.loads((run / "splits.json").read_text())["train"])
        assert cams[cams.files[0]].shape == (10, 12)  # 80x96 at stride 8
