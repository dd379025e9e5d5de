"""Datasets, deterministic splits and the joint image/CAM augmentation.

Planes: `src_` pixels of the stored image file, `in_` pixels after resampling to the model's `input_mpp`
(the plane the network sees), `fm_` feature-map cells (`in / output_stride`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

GLAS_CLASSES = ("benign", "malignant")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WHITE = 255


class DatasetError(RuntimeError):
    """The dataset on disk is missing or does not have the expected layout."""


@dataclass(frozen=True)
class Record:
    """One labelled image: `name` is unique in the dataset, `mask_path` is None when unannotated."""

    name: str
    image_path: Path
    mask_path: Path | None
    label: int
    subset: str  # "train" (may go to train/valcl/valpx) or "test"


@dataclass
class Sample:
    """A record loaded at the model's scale: image (H, W, 3) uint8, mask (H, W) bool or None, and for slide tiles
    the tissue mask the service gates its heatmap with."""

    record: Record
    image: np.ndarray
    mask: np.ndarray | None = field(default=None)
    tissue: np.ndarray | None = field(default=None)  # slide tiles: (H, W) bool, the service's tissue mask


def default_data_dir() -> Path:
    """`PIXELCAM_DATA_DIR`, else `shared/data` beside the repository root."""
    env = os.environ.get("PIXELCAM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_glas(root: Path) -> list[Record]:
    """Read the GlaS layout: `images/<name>.png`, `masks/<name>.png` and `Grade.csv`."""
    grade_csv = root / "Grade.csv"
    if not grade_csv.is_file():
        raise DatasetError(f"{grade_csv} not found: point --data-dir at the folder holding glas/ (PIXELCAM_DATA_DIR)")
    records: list[Record] = []
    with grade_csv.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader)]
        col = header.index("grade (GlaS)")
        for row in reader:
            if not row:
                continue
            name, grade = row[0].strip(), row[col].strip()
            if grade not in GLAS_CLASSES:
                raise DatasetError(f"{grade_csv}: unknown grade {grade!r} for {name}; expected benign/malignant")
            image_path = root / "images" / f"{name}.png"
            if not image_path.is_file():
                logger.warning("GlaS image %s listed in Grade.csv is missing; skipped", image_path)
                continue
            mask_path = root / "masks" / f"{name}.png"
            subset = "train" if name.startswith("train_") else "test"
            records.append(
                Record(name, image_path, mask_path if mask_path.is_file() else None, GLAS_CLASSES.index(grade), subset)
            )
    if not records:
        raise DatasetError(f"no GlaS images found under {root}/images")
    return sorted(records, key=lambda r: _natural_key(r.name))


def load_folder_dataset(root: Path, class_names: tuple[str, ...]) -> list[Record]:
    """Read `root/{train,test}/<class>/*.png` with optional masks `root/masks/<class>/<stem>.png`."""
    records: list[Record] = []
    for subset in ("train", "test"):
        for label, cls in enumerate(class_names):
            folder = root / subset / cls
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                mask = root / "masks" / cls / f"{path.stem}.png"
                records.append(
                    Record(f"{subset}/{cls}/{path.stem}", path, mask if mask.is_file() else None, label, subset)
                )
    if not any(r.subset == "train" for r in records):
        raise DatasetError(
            f"no training images under {root}/train/<class>/ for classes {list(class_names)}; "
            "expected root/train/<class>/*.png, root/test/<class>/*.png and optional root/masks/<class>/<stem>.png"
        )
    return records


def make_splits(
    records: list[Record], *, seed: int, valcl_frac: float = 0.2, valpx_per_class: int = 3
) -> dict[str, list[str]]:
    """Split names into train / valcl / valpx (⊂ valcl, with masks) / test, stratified by class."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {"train": [], "valcl": [], "valpx": [], "test": []}
    labels = sorted({r.label for r in records})
    for label in labels:
        pool = sorted((r for r in records if r.subset == "train" and r.label == label), key=lambda r: r.name)
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_val = max(1, round(valcl_frac * len(pool))) if len(pool) > 1 else 0
        # valpx first (masked images, random), then valcl is filled up with random others
        px = [r for r in order if r.mask_path is not None][: min(valpx_per_class, n_val)]
        rest = [r for r in order if r not in px]
        val = px + rest[: n_val - len(px)]
        splits["valpx"] += [r.name for r in px]
        splits["valcl"] += [r.name for r in val]
        splits["train"] += [r.name for r in rest[n_val - len(px) :]]
    splits["test"] = [r.name for r in records if r.subset == "test"]
    for key in splits:
        splits[key] = sorted(splits[key], key=_natural_key)
    return splits


def _natural_key(name: str) -> tuple[str, int]:
    stem, _, num = name.rpartition("_")
    return (stem, int(num)) if num.isdigit() else (name, -1)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot read image {path}: is it a valid PNG/JPEG/TIFF?")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_sample(record: Record, *, scale: float) -> Sample:
    """Load one record resampled by `scale` (= source mpp / input mpp) on both axes."""
    src = read_rgb(record.image_path)
    src_h, src_w = src.shape[:2]
    in_wh = (max(1, round(src_w * scale)), max(1, round(src_h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    image = src if scale == 1 else cv2.resize(src, in_wh, interpolation=interp)
    mask = None
    if record.mask_path is not None:
        raw = cv2.imread(str(record.mask_path), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise DatasetError(f"cannot read mask {record.mask_path}")
        mask = cv2.resize(raw, in_wh, interpolation=cv2.INTER_NEAREST) > 127
    return Sample(record, np.ascontiguousarray(image), mask)


def load_samples(records: list[Record], names: list[str], *, scale: float) -> list[Sample]:
    """Load the named records (in the given order) at the model's scale."""
    by_name = {r.name: r for r in records}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DatasetError(f"split names not in the dataset: {missing[:5]}; delete the run's splits.json to redo it")
    return [load_sample(by_name[n], scale=scale) for n in names]


@dataclass(frozen=True)
class GeomAug:
    """One draw of the geometric augmentation: crop offset (in_ px), flips and quarter turns."""

    top: int
    left: int
    hflip: bool
    vflip: bool
    rot90: int


def draw_geom(rng: np.random.Generator, in_hw: tuple[int, int], size: int) -> GeomAug:
    """Draw a crop offset inside the (padded) image, random flips and quarter turns."""
    h, w = max(in_hw[0], size), max(in_hw[1], size)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return GeomAug(top, left, bool(rng.random() < 0.5), bool(rng.random() < 0.5), int(rng.integers(0, 4)))


def apply_geom(array: np.ndarray, aug: GeomAug, size: int, fill: float) -> np.ndarray:
    """Crop (padding with `fill` when the image is smaller), flip and rotate an (H, W[, C]) array."""
    h, w = array.shape[:2]
    if h < size or w < size:
        pad = [(0, max(0, size - h)), (0, max(0, size - w))] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad, mode="constant", constant_values=fill)
    out = array[aug.top : aug.top + size, aug.left : aug.left + size]
    if aug.hflip:
        out = out[:, ::-1]
    if aug.vflip:
        out = out[::-1]
    if aug.rot90:
        out = np.rot90(out, aug.rot90)
    return np.ascontiguousarray(out)


def cam_to_image(cam: np.ndarray, in_hw: tuple[int, int], stride: int) -> np.ndarray:
    """Resize a CAM (h, w) of the stride-padded image bilinearly to (h·k, w·k) and crop it to (H, W)."""
    padded_wh = (cam.shape[1] * stride, cam.shape[0] * stride)
    full = cv2.resize(cam.astype(np.float32), padded_wh, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(full[: in_hw[0], : in_hw[1]])


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation jitter of an (H, W, 3) uint8 image (image only, never the CAM)."""
    if strength <= 0:
        return image
    x = image.astype(np.float32)
    b, c, s = 1 + rng.uniform(-strength, strength, size=3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * s + gray
    return np.clip(x, 0, 255).astype(np.uint8)


def make_train_batch(
    samples: list[Sample],
    indices: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    cams: dict[str, np.ndarray] | None = None,
    stride: int = 8,
    jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random crops of the chosen samples: images (B, S, S, 3) uint8, labels (B,), CAMs (B, S, S) or None."""
    images, labels, crops = [], [], []
    for i in indices:
        sample = samples[int(i)]
        aug = draw_geom(rng, sample.image.shape[:2], size)
        images.append(color_jitter(apply_geom(sample.image, aug, size, WHITE), rng, jitter))
        labels.append(sample.record.label)
        if cams is not None:
            full = cam_to_image(cams[sample.record.name], sample.image.shape[:2], stride)
            crops.append(apply_geom(full, aug, size, 0.0))
    cam_batch = np.stack(crops) if cams is not None else None
    return np.stack(images), np.asarray(labels, dtype=np.int64), cam_batch
