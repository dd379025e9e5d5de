"""Whole-slide images as a training set (`--dataset slides`): a manifest, splits by slide, and a tile cache.

The manifest (CSV with the header `slide,label[,annotations][,mpp][,split]`, or YAML: a list of such mappings, or
`{slides: [...]}`) names each slide file, its class, an optional QuPath GeoJSON export, an optional mpp override and
an optional split (train, valcl, valpx, test). Paths are relative to the manifest's folder.

Tiles are laid by the service's own code (`open_slide`, `detect_tissue`, `plan_tiles` at the model's input_mpp and
input_size, the service's default min_tissue) and read by its `TileReader`, so training sees exactly the pixels
`pixelcam analyze` feeds the model. Each slide's tiles are extracted once into `<run_dir>/tiles/<slide>-<key>/`
(`tiles.npy` uint8 (N, S, S, 3), `tissue.npy` bool (N, S, S) the service's tissue mask at each tile pixel,
`masks.npy` bool (N, S, S) when the slide has annotations, `meta.json`), written in
batches into a memory map and renamed into place when complete; the key hashes the slide's and the annotations'
bytes and every setting that shapes the tiles, so a rerun reuses them and a changed slide is extracted again.

Labelling (`label_from`): "slide" gives every tissue tile its slide's class, and annotations of the foreground
class are pixel ground truth used only to score (the weak supervision PixelCAM is about); "annotation"
(CAMELYON-style) labels the tiles at least half inside regions of the positive class positive, every tile of a
slide of another class that class, and leaves the other tiles of positive slides out.

Planes: `l0_` level-0 slide pixels, `in_` model-input pixels of a tile (`l0 = tile l0 + in * l0_tile / S`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from service.analysis.plan import AnalysisOptions, file_sha256
from service.outputs.annotations import (
    AnnotatedPolygon,
    AnnotationError,
    class_counts,
    rasterize,
    read_annotations,
    select_classes,
)
from service.slide.errors import SlideError
from service.slide.tile_reader import TileReader
from service.slide.tiling import TilePlan, TissueMask, detect_tissue, plan_tiles
from service.slide.wsi import open_slide
from training.data import DatasetError, Record, Sample

__all__ = [
    "LABEL_MODES",
    "SlideEntry",
    "SlideTiles",
    "TileSource",
    "annotation_names",
    "extract_slide",
    "read_manifest",
    "slide_splits",
]

logger = logging.getLogger(__name__)

LABEL_MODES = ("slide", "annotation")
SPLITS = ("train", "valcl", "valpx", "test")
CACHE_VERSION = 3
BATCH = 64  # tiles read and written per step (bounded memory: one batch in RAM)
INSIDE_FRACTION = 0.5  # label_from annotation: a tile is positive when at least this share is inside a region


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row, resolved: `id` is unique in the manifest (the file's stem, numbered when repeated)."""

    id: str
    path: Path
    label: str
    annotations: Path | None
    mpp: float | None
    split: str | None
    row: int  # 1-based data row of the manifest, for messages


def _rows_of(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise DatasetError(f"cannot read manifest {path}: {err}") from err
        rows = doc.get("slides") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DatasetError(f"{path}: a YAML manifest is a list of mappings with slide and label (or "
                               "{slides: [...]})")
        return rows
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("slide", "label") if c not in header]
            if missing:
                raise DatasetError(f"{path}: the header must name the columns slide,label[,annotations][,mpp]"
                                   f"[,split]; missing {missing} (found {header})")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as err:
        raise DatasetError(f"cannot read manifest {path}: {err}") from err


def _resolve(root: Path, text: str, what: str, where: str) -> Path:
    path = Path(text) if Path(text).is_absolute() else (root / text).resolve()
    if not path.exists():
        raise DatasetError(f"{where}: {what} {text} not found (paths are relative to the manifest's folder)")
    return path


def _mpp_of(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        raise DatasetError(f"{where}: mpp must be a number of µm per pixel, got {text!r}") from None
    if not 0.05 <= mpp <= 100:
        raise DatasetError(f"{where}: mpp {mpp} is outside [0.05, 100] µm/px")
    return mpp


def _entry_of(row: dict[str, Any], root: Path, class_names: tuple[str, ...], where: str) -> SlideEntry:
    """One row checked (its id is filled in by `read_manifest`)."""
    slide = str(row.get("slide") or "").strip()
    label = str(row.get("label") or "").strip()
    if not slide or not label:
        raise DatasetError(f"{where}: slide and label are required")
    slide_path = _resolve(root, slide, "slide", where)
    if label not in class_names:
        raise DatasetError(f"{where}: label {label!r} is not one of the classes {list(class_names)} "
                           "(set class_names in the config)")
    ann = str(row.get("annotations") or "").strip()
    ann_path = _resolve(root, ann, "annotations", where) if ann else None
    split = str(row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{where}: split must be one of {SPLITS} or empty, got {split!r}")
    return SlideEntry("", slide_path, label, ann_path, _mpp_of(str(row.get("mpp") or "").strip(), where), split,
                      0)


def read_manifest(path: str | Path, class_names: tuple[str, ...]) -> list[SlideEntry]:
    """Read and check a manifest: every file exists, labels are class names, mpp and split are valid."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found (--manifest: a CSV slide,label[,annotations][,mpp][,split])")
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(_rows_of(path), start=1):
        where = f"{path.name} row {i}"
        entry = _entry_of(row, path.parent, class_names, where)
        if any(e.path == entry.path for e in entries):
            raise DatasetError(f"{where}: slide {entry.path.name} is listed twice")
        stem = entry.path.stem if entry.path.is_file() else entry.path.name
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        entries.append(dataclasses.replace(entry, id=stem if n == 0 else f"{stem}~{n + 1}", row=i))
    if not entries:
        raise DatasetError(f"manifest {path} lists no slides")
    return entries


def slide_splits(entries: list[SlideEntry], *, seed: int, valcl_frac: float, test_frac: float) -> dict[str, list[str]]:
    """Slide ids per split: the manifest's splits where given, the rest drawn per class from `seed`.

    Per class, of the slides without a split, round(test_frac * n) go to test (only when the manifest names no
    test slide, and when the class has more than 2) and max(1, round(valcl_frac * n)) (none when the class has a
    single slide) to valcl, preferring annotated slides for valcl; the rest train. valpx is every valcl (or valpx)
    slide with annotations. No slide is in two splits but valcl/valpx.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for e in entries:
        if e.split is not None:
            out["valcl" if e.split == "valpx" else e.split].append(e.id)
    draw_test = not out["test"]
    for label in sorted({e.label for e in entries}):
        pool = sorted((e for e in entries if e.label == label and e.split is None), key=lambda e: e.id)
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test = round(test_frac * len(order)) if draw_test and len(order) > 2 else 0
        out["test"] += [e.id for e in order[:n_test]]
        rest = order[n_test:]
        n_val = max(1, round(valcl_frac * len(rest))) if len(rest) > 1 else 0
        val = sorted(rest, key=lambda e: e.annotations is None)[:n_val]  # stable: annotated first, random order
        out["valcl"] += [e.id for e in val]
        out["train"] += [e.id for e in rest if e not in val]
    by_id = {e.id: e for e in entries}
    out["valpx"] = [i for i in out["valcl"] if by_id[i].annotations is not None]
    for key in out:
        out[key] = sorted(out[key])
    if not out["train"]:
        raise DatasetError("no slide is left for training: give more slides, or fewer valcl/test splits")
    missing = sorted({e.label for e in entries} - {by_id[i].label for i in out["train"]})
    if missing:
        raise DatasetError(f"no training slide of class {missing}: every class needs at least one train slide")
    return out


def annotation_names(foreground_name: str, positive_class: str) -> tuple[str, ...]:
    """Annotation classes that mark the foreground (pixel truth) and, with label_from annotation, the positive
    regions: the model's foreground name and its positive class (matched case-insensitively)."""
    return tuple(dict.fromkeys((foreground_name, positive_class)))


@dataclass(frozen=True)
class SlideTiles:
    """One slide's extracted tiles in the cache."""

    entry: SlideEntry
    folder: Path
    n_tiles: int
    labels: np.ndarray  # (N,) int64 class index per tile; -1 = left out (label_from annotation)
    has_masks: bool
    meta: dict[str, Any]


def _sha256_bytes(path: Path) -> str:
    return file_sha256(path) if path.is_file() else hashlib.sha256(str(path).encode()).hexdigest()


def _slide_file(path: Path) -> Path:
    """The file whose bytes identify the slide (a DICOM folder: its largest file)."""
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
        if not files:
            raise DatasetError(f"slide folder {path} is empty")
        return files[-1]
    return path


def _tile_masks(polys: list[AnnotatedPolygon], l0_xy: np.ndarray, l0_tile: float, size: int,
                l0_offset: tuple[int, int]) -> np.ndarray:
    """(n, S, S) bool: each tile's pixels inside the polygons (annotations in QuPath's frame: l0 - offset)."""
    scale = size / l0_tile
    return np.stack([rasterize(polys, (float(x - l0_offset[0]), float(y - l0_offset[1])), scale, (size, size))
                     for x, y in l0_xy]) if len(l0_xy) else np.zeros((0, size, size), bool)


def _tile_tissue(tissue: TissueMask, l0_xy: np.ndarray, l0_tile: float, size: int) -> np.ndarray:
    """(n, S, S) bool: the slide's tissue mask (the one `tissue_only` gates the heatmap with) at each tile pixel's
    centre."""
    mask = tissue.mask
    h, w = mask.shape
    step = (np.arange(size) + 0.5) * (l0_tile / size)
    out = np.empty((len(l0_xy), size, size), bool)
    for k, (x, y) in enumerate(l0_xy):
        cols = np.clip(((x + step) / tissue.l0_per_px).astype(np.int64), 0, w - 1)
        rows = np.clip(((y + step) / tissue.l0_per_px).astype(np.int64), 0, h - 1)
        out[k] = mask[np.ix_(rows, cols)]
    return out


def context_plan(plan: TilePlan, margin: int) -> TilePlan:
    """The same tiles grown by `margin` model-input px on every side (read by the same reader; the centre S x S of
    each is the service's tile, byte for byte; outside the slide reads as white)."""
    if margin == 0:
        return plan
    s = plan.input_size
    l0_margin = int(round(margin * plan.l0_tile_size / s))
    return dataclasses.replace(plan, l0_xy=plan.l0_xy - l0_margin, l0_tile_size=plan.l0_tile_size * (s + 2 * margin) / s,
                               lvl_tile_size=int(round(plan.lvl_tile_size * (s + 2 * margin) / s)),
                               input_size=s + 2 * margin)


def extract_slide(entry: SlideEntry, cache_root: Path, *, class_names: tuple[str, ...], input_mpp: float,
                  input_size: int, label_from: str, positive_class: str, annotation_classes: tuple[str, ...],
                  min_tissue: float | None = None, margin: int = 0, progress: bool = True) -> SlideTiles:
    """The slide's tiles, from the cache when its key matches, else read now (in batches) and cached.

    With `margin` m > 0 each cached image is the tile with m px of context on every side ((S + 2m)², the tile at
    [m, m + S)), so that training can draw random S x S crops around it as the image recipe does."""
    if label_from not in LABEL_MODES:
        raise DatasetError(f"label_from must be one of {LABEL_MODES}, got {label_from!r}")
    min_tissue = AnalysisOptions().min_tissue if min_tissue is None else min_tissue
    ann_sha = file_sha256(entry.annotations) if entry.annotations else None
    key_doc = {"version": CACHE_VERSION, "slide_sha256": _sha256_bytes(_slide_file(entry.path)),
               "annotations_sha256": ann_sha, "mpp": entry.mpp, "input_mpp": input_mpp, "input_size": input_size,
               "min_tissue": min_tissue, "margin": margin, "label_from": label_from, "label": entry.label,
               "class_names": list(class_names), "positive_class": positive_class,
               "annotation_classes": sorted(c.casefold() for c in annotation_classes)}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / f"{entry.id}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        logger.info("tiles of %s: %d from the cache (%s)", entry.id, meta["n_tiles"], folder.name)
        return SlideTiles(entry, folder, int(meta["n_tiles"]), np.asarray(meta["labels"], np.int64),
                          bool(meta["has_masks"]), meta)
    for stale in cache_root.glob(f"{entry.id}-*"):  # an earlier version of this slide or other settings
        if stale.is_dir() and stale.name[len(entry.id) + 1:].isalnum() and len(stale.name) == len(folder.name):
            shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    polys: list[AnnotatedPolygon] = []
    counts: dict[str, int] = {}
    if entry.annotations is not None:
        try:
            every = read_annotations(entry.annotations)
        except AnnotationError as err:
            raise DatasetError(f"manifest row {entry.row}: {err}") from err
        counts = class_counts(every)
        polys = select_classes(every, annotation_classes)
        if not polys:
            logger.warning("%s: no annotation of class %s (found %s); its masks are empty", entry.annotations.name,
                           list(annotation_classes), counts)
    try:
        with open_slide(entry.path, mpp_override=entry.mpp) as slide:
            info = slide.info
            tissue = detect_tissue(slide)
            plan = plan_tiles(info, tissue, input_mpp=input_mpp, input_size=input_size, min_tissue=min_tissue)
            read = context_plan(plan, margin)
            side = input_size + 2 * margin
            offset = (int(info.bounds[0]), int(info.bounds[1])) if info.bounds else (0, 0)
            tmp = cache_root / f".{folder.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            n = len(plan)
            tiles = np.lib.format.open_memmap(tmp / "tiles.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
            masks = (np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, side, side))
                     if entry.annotations else None)
            on_tissue = np.lib.format.open_memmap(tmp / "tissue.npy", mode="w+", dtype=np.bool_, shape=(n, side, side))
            inside = np.zeros(n, np.float32)
            bar = tqdm(total=n, desc=f"tiles {entry.id}", unit="tile", leave=False, disable=not progress)
            core = slice(margin, margin + input_size)
            with TileReader(slide, read) as reader:
                for idx, batch in reader.iter_batches(range(n), BATCH):
                    tiles[idx] = batch
                    on_tissue[idx] = _tile_tissue(tissue, read.l0_xy[idx], read.l0_tile_size, side)
                    if masks is not None:
                        part = _tile_masks(polys, read.l0_xy[idx], read.l0_tile_size, side, offset)
                        masks[idx] = part
                        inside[idx] = part[:, core, core].reshape(len(part), -1).mean(axis=1)
                    bar.update(len(idx))
            bar.close()
            tiles.flush()
            on_tissue.flush()
            del tiles, on_tissue
            if masks is not None:
                masks.flush()
                del masks
    except SlideError as err:
        raise DatasetError(f"manifest row {entry.row}: cannot read slide {entry.path.name}: {err}") from err
    labels = _tile_labels(entry, inside, class_names, label_from, positive_class)
    meta = {**key_doc, "slide": entry.id, "n_tiles": int(n), "labels": labels.tolist(),
            "has_masks": entry.annotations is not None, "annotation_counts": counts,
            "l0_xy": plan.l0_xy.tolist(), "tissue_fraction": [round(float(f), 4) for f in plan.tissue_fraction],
            "l0_tile_size": plan.l0_tile_size, "slide_mpp": info.mpp,
            "mpp_source": info.mpp_source,
            "extract_s": round(time.perf_counter() - t0, 3)}
    (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, folder)
    logger.info("tiles of %s: %d extracted in %.1f s (%.0f tiles/s)", entry.id, n, meta["extract_s"],
                n / max(meta["extract_s"], 1e-9))
    return SlideTiles(entry, folder, int(n), labels, entry.annotations is not None, meta)


def _tile_labels(entry: SlideEntry, inside: np.ndarray, class_names: tuple[str, ...], label_from: str,
                 positive_class: str) -> np.ndarray:
    slide_label = class_names.index(entry.label)
    labels = np.full(inside.shape, slide_label, np.int64)
    if label_from == "annotation" and entry.label == positive_class:
        if entry.annotations is None:
            raise DatasetError(f"manifest row {entry.row}: label_from annotation needs the regions of each "
                               f"{positive_class} slide: give {entry.id} an annotations file")
        labels[inside < INSIDE_FRACTION] = -1
    return labels


class TileSource:
    """Records and samples of the extracted tiles: a record per kept tile, named `<slide id>/<tile index>`."""

    def __init__(self, slides: list[SlideTiles], split_of: dict[str, str], *, max_per_slide: int = 0,
                 seed: int = 0, train_min_tissue: float = 0.0) -> None:
        self.slides = {s.entry.id: s for s in slides}
        self.records: list[Record] = []
        rng = np.random.default_rng(seed)
        for s in slides:
            usable = s.labels >= 0
            if train_min_tissue > 0 and split_of.get(s.entry.id, "train") == "train":
                usable &= np.asarray(s.meta["tissue_fraction"], np.float32) >= train_min_tissue
            keep = np.flatnonzero(usable)
            if max_per_slide > 0 and len(keep) > max_per_slide:
                keep = np.sort(rng.choice(keep, max_per_slide, replace=False))
            masks = s.folder / "masks.npy" if s.has_masks else None
            for i in keep:
                self.records.append(Record(f"{s.entry.id}/{int(i):05d}", s.folder / "tiles.npy", masks,
                                           int(s.labels[i]), split_of.get(s.entry.id, "train")))
        self._arrays: dict[Path, np.ndarray] = {}
        self._by_name = {r.name: r for r in self.records}

    def names(self, slide_ids: list[str]) -> list[str]:
        """Tile names of these slides, in order."""
        wanted = set(slide_ids)
        return [r.name for r in self.records if r.name.rsplit("/", 1)[0] in wanted]

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._arrays:
            self._arrays[path] = np.load(path, mmap_mode="c")  # copy-on-write: writable views, file untouched
        return self._arrays[path]

    def tissue(self, name: str) -> np.ndarray:
        """(S, S) bool: the named tile's pixels on the slide's tissue mask."""
        r = self._by_name[name]
        return np.asarray(self._array(r.image_path.with_name("tissue.npy"))[int(name.rsplit("/", 1)[1])])

    def load(self, names: list[str]) -> list[Sample]:
        """Samples of the named tiles (images and masks are views into the memory-mapped cache)."""
        by_name = {r.name: r for r in self.records}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DatasetError(f"tiles not in the dataset: {missing[:5]}; delete the run's splits.json to redo it")
        out = []
        for n in names:
            r = by_name[n]
            i = int(n.rsplit("/", 1)[1])
            mask = np.asarray(self._array(r.mask_path)[i]) if r.mask_path is not None else None
            tissue = np.asarray(self._array(r.image_path.with_name("tissue.npy"))[i])
            out.append(Sample(r, np.asarray(self._array(r.image_path)[i]), mask, tissue))
        return out
