"""Mosaic slides from GlaS: real tissue as whole-slide files with QuPath annotations, for `--dataset slides`.

Each mosaic holds several GlaS images of one grade laid on white glass (a grid with gaps wider than a tile), written
as a tiled TIFF whose resolution tags say 0.62005 µm/px (the GlaS scans), beside a QuPath GeoJSON of the gland masks
(level-0 pixels, class "Gland") and one manifest.csv for all of them (`slide,label,annotations,mpp,split`; test
images get split `test`, training images no split, so the recipe splits them by slide).

    python -m training.mosaics OUT_DIR [--subset train|test|all] [--per-slide 4] [--max-slides N] [--seed 0]
        [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np

from service.outputs.annotations import mask_to_features
from training.config import GLAS_MPP
from training.data import GLAS_CLASSES, Record, default_data_dir, load_glas, read_rgb
from training.slide_eval import write_slide

__all__ = ["MANIFEST_COLUMNS", "compose", "main", "write_mosaics"]

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide", "label", "annotations", "mpp", "split")
GAP_PX = 400  # white glass between pieces and around them, level-0 px (about 250 µm: wider than a 224 µm tile)
COLUMNS = 2
WHITE = 255


def compose(images: list[np.ndarray], masks: list[np.ndarray], *, columns: int = COLUMNS,
            gap: int = GAP_PX) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Lay images (and their masks) on a white canvas in a grid of `columns`: (rgb, mask, top-left of each)."""
    cell_w = max(im.shape[1] for im in images)
    cell_h = max(im.shape[0] for im in images)
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    canvas = np.full((gap + rows * (cell_h + gap), gap + cols * (cell_w + gap), 3), WHITE, np.uint8)
    full_mask = np.zeros(canvas.shape[:2], bool)
    corners = []
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        x = gap + (i % columns) * (cell_w + gap)
        y = gap + (i // columns) * (cell_h + gap)
        canvas[y : y + im.shape[0], x : x + im.shape[1]] = im
        full_mask[y : y + m.shape[0], x : x + m.shape[1]] = m
        corners.append((x, y))
    return canvas, full_mask, corners


def _groups(records: list[Record], per_slide: int, seed: int) -> list[tuple[str, str, list[Record]]]:
    """(subset, grade, records) per mosaic: images of one subset and grade, shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for subset in ("train", "test"):
        for label, grade in enumerate(GLAS_CLASSES):
            pool = [r for r in records if r.subset == subset and r.label == label]
            order = [pool[i] for i in rng.permutation(len(pool))]
            out += [(subset, grade, order[i : i + per_slide]) for i in range(0, len(order), per_slide)]
    return out


def write_mosaics(glas_dir: Path, out_dir: Path, *, subset: str = "train", images_per_slide: int = 4,
                  max_slides: int | None = None, seed: int = 0) -> Path:
    """Write mosaic slides, their GeoJSON and `manifest.csv` into `out_dir`; returns the manifest's path.

    `subset`: "train" (GlaS train_*), "test" (testA/testB) or "all". `max_slides` keeps that many mosaics per
    subset and grade (the first ones), for tests. Each mosaic's `.json` sidecar lists the images it holds.
    """
    if subset not in ("train", "test", "all"):
        raise ValueError(f"subset must be 'train', 'test' or 'all', got {subset!r}")
    if images_per_slide < 1:
        raise ValueError(f"images_per_slide must be >= 1, got {images_per_slide}")
    records = [r for r in load_glas(Path(glas_dir)) if subset in ("all", r.subset)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    counters: dict[tuple[str, str], int] = {}
    for sub, grade, group in _groups(records, images_per_slide, seed):
        k = counters.get((sub, grade), 0)
        if max_slides is not None and k >= max_slides:
            continue
        counters[(sub, grade)] = k + 1
        name = f"glas-{sub}-{grade}-{k + 1:02d}"
        images = [read_rgb(r.image_path) for r in group]
        masks = [read_rgb(r.mask_path)[..., 0] > 127 if r.mask_path else np.zeros(im.shape[:2], bool)
                 for r, im in zip(group, images, strict=True)]
        rgb, mask, corners = compose(images, masks)
        write_slide(rgb, out_dir / f"{name}.tif", GLAS_MPP)
        doc = {"type": "FeatureCollection", "features": mask_to_features(mask, "Gland")}
        (out_dir / f"{name}.geojson").write_text(json.dumps(doc), encoding="utf-8")
        (out_dir / f"{name}.json").write_text(json.dumps(
            {"grade": grade, "images": [{"name": r.name, "l0_xy": list(c), "size_wh": [im.shape[1], im.shape[0]]}
                                        for r, c, im in zip(group, corners, images, strict=True)]}, indent=1))
        rows.append({"slide": f"{name}.tif", "label": grade, "annotations": f"{name}.geojson", "mpp": "",
                     "split": "test" if sub == "test" else ""})
        logger.info("wrote %s: %d %s images, %d x %d px", name, len(group), grade, rgb.shape[1], rgb.shape[0])
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.mosaics", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--subset", choices=["train", "test", "all"], default="all")
    ap.add_argument("--per-slide", type=int, default=4, help="GlaS images per mosaic (default 4)")
    ap.add_argument("--max-slides", type=int, default=None, help="at most this many mosaics per subset and grade")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None, help="the folder holding glas/ (PIXELCAM_DATA_DIR)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = write_mosaics((args.data_dir or default_data_dir()) / "glas", args.out_dir, subset=args.subset,
                             images_per_slide=args.per_slide, max_slides=args.max_slides, seed=args.seed)
    print(f"manifest: {manifest}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
