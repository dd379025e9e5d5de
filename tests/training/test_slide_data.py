"""`--dataset slides`: manifests, splits by slide, and tiles extracted by the service's own tiler into a cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from model.runtime import ModelMetadata, read_model_metadata
from service.analysis.plan import AnalysisOptions, prepare_job
from service.outputs.annotations import read_annotations, select_classes
from service.slide.tile_reader import TileReader
from tests.conftest import REPO_ROOT
from training.data import DatasetError, read_rgb
from training.mosaics import compose, write_mosaics
from training.slide_data import SlideEntry, TileSource, extract_slide, read_manifest, slide_splits

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory, glas_dir: Path) -> Path:
    """One mosaic per grade of GlaS train images, 2 images each (small and fast to extract)."""
    return write_mosaics(glas_dir, tmp_path_factory.mktemp("mosaics"), subset="train", images_per_slide=2,
                         max_slides=1)


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide", "label", "annotations", "mpp", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mosaic_annotations_give_back_the_gland_masks(mosaics: Path, glas_dir: Path) -> None:
    """The GeoJSON written for a mosaic rasterises back to the GlaS masks placed where the images are."""
    from service.outputs.annotations import rasterize

    name = "glas-train-benign-01"
    side = json.loads((mosaics.parent / f"{name}.json").read_text())
    images = [read_rgb(glas_dir / "images" / f"{e['name']}.png") for e in side["images"]]
    masks = [read_rgb(glas_dir / "masks" / f"{e['name']}.png")[..., 0] > 127 for e in side["images"]]
    _, expected, corners = compose(images, masks)
    assert [list(c) for c in corners] == [e["l0_xy"] for e in side["images"]]
    polys = read_annotations(mosaics.parent / f"{name}.geojson")
    got = rasterize(polys, (0, 0), 1.0, (expected.shape[1], expected.shape[0]))
    iou = (got & expected).sum() / (got | expected).sum()
    assert iou > 0.98 and expected.sum() > 10_000


def test_manifest_is_read_relative_to_its_folder(mosaics: Path) -> None:
    entries = read_manifest(mosaics, CLASSES)
    assert [e.label for e in entries] == ["benign", "malignant"]
    assert all(e.path.is_file() and e.annotations is not None and e.annotations.is_file() for e in entries)
    assert [e.id for e in entries] == ["glas-train-benign-01", "glas-train-malignant-01"]


@pytest.mark.parametrize(("row", "message"), [
    ({"slide": "nope.tif", "label": "benign"}, "slide nope.tif not found"),
    ({"slide": "glas-train-benign-01.tif", "label": "tumour"}, "label 'tumour' is not one of the classes"),
    ({"slide": "glas-train-benign-01.tif", "label": "benign", "annotations": "x.geojson"}, "annotations x.geojson"),
    ({"slide": "glas-train-benign-01.tif", "label": "benign", "mpp": "fast"}, "mpp must be a number"),
    ({"slide": "glas-train-benign-01.tif", "label": "benign", "mpp": "0.001"}, "outside [0.05, 100]"),
    ({"slide": "glas-train-benign-01.tif", "label": "benign", "split": "holdout"}, "split must be one of"),
])
def test_bad_manifest_rows_are_refused_with_the_row(mosaics: Path, row: dict[str, str], message: str) -> None:
    path = _write_manifest(mosaics.parent / "bad.csv", [row])
    with pytest.raises(DatasetError, match="row 1") as err:
        read_manifest(path, CLASSES)
    assert message in str(err.value)


def test_manifest_without_the_label_column_and_duplicates_are_refused(mosaics: Path) -> None:
    path = mosaics.parent / "nolabel.csv"
    path.write_text("slide\nglas-train-benign-01.tif\n")
    with pytest.raises(DatasetError, match=r"missing \['label'\]"):
        read_manifest(path, CLASSES)
    dup = _write_manifest(mosaics.parent / "dup.csv", [{"slide": "glas-train-benign-01.tif", "label": "benign"}] * 2)
    with pytest.raises(DatasetError, match="listed twice"):
        read_manifest(dup, CLASSES)


def _entries(n_per_class: int, annotated: bool = True) -> list[SlideEntry]:
    return [SlideEntry(f"{c}-{i}", Path(f"{c}-{i}.tif"), c, Path("a.geojson") if annotated else None, None, None, i)
            for c in CLASSES for i in range(n_per_class)]


def test_splits_are_by_slide_deterministic_and_disjoint() -> None:
    entries = _entries(10)
    a = slide_splits(entries, seed=0, valcl_frac=0.2, test_frac=0.2)
    assert a == slide_splits(entries, seed=0, valcl_frac=0.2, test_frac=0.2)
    assert a != slide_splits(entries, seed=1, valcl_frac=0.2, test_frac=0.2)
    assert {len(a[s]) for s in ("train", "valcl", "test")} == {12, 4}
    assert not (set(a["train"]) & set(a["valcl"])) and not (set(a["train"]) & set(a["test"]))
    assert not (set(a["valcl"]) & set(a["test"])) and a["valpx"] == a["valcl"]
    assert sorted(a["train"] + a["valcl"] + a["test"]) == sorted(e.id for e in entries)


def test_manifest_splits_are_kept_and_valpx_needs_annotations() -> None:
    entries = _entries(3, annotated=False)
    entries[0] = SlideEntry("benign-0", Path("b.tif"), "benign", None, None, "test", 0)
    s = slide_splits(entries, seed=0, valcl_frac=0.5, test_frac=0.0)
    assert "benign-0" in s["test"] and s["valpx"] == [] and len(s["valcl"]) == 1 + 2  # round(0.5 * 2), round(0.5 * 3)
    held = SlideEntry("held-out", Path("h.tif"), "benign", None, None, "test", 0)
    named = slide_splits(_entries(10) + [held], seed=0, valcl_frac=0.2, test_frac=0.2)
    assert named["test"] == ["held-out"]  # a manifest naming test slides gets no more drawn
    assert len(named["train"]) + len(named["valcl"]) == 20
    with pytest.raises(DatasetError, match="no training slide of class"):
        slide_splits([entries[0], *_entries(2)[2:]], seed=0, valcl_frac=0.2, test_frac=0.0)


def test_tiles_are_the_service_tiles_with_masks_and_cached(mosaics: Path, tmp_path: Path) -> None:
    entry = read_manifest(mosaics, CLASSES)[1]
    kwargs = {"class_names": CLASSES, "input_mpp": 2.0, "input_size": 64, "label_from": "slide",
              "positive_class": "malignant", "annotation_classes": ("Gland",), "progress": False}
    tiles = extract_slide(entry, tmp_path / "cache", **kwargs)
    # the plan is the one the service makes for this slide at this model scale, with its default options
    meta = ModelMetadata.from_dict({**_meta_dict(), "input_mpp": 2.0, "input_size": 64})
    plan = prepare_job(entry.path, meta, AnalysisOptions(inference="tiles"), tmp_path / "job")
    assert tiles.n_tiles == len(plan) > 10
    assert tiles.meta["l0_xy"] == plan.l0_xy.tolist()
    cached = np.load(tiles.folder / "tiles.npy")
    with TileReader(entry.path, plan.tiles) as reader:
        np.testing.assert_array_equal(cached, reader.read(range(len(plan))))
    masks = np.load(tiles.folder / "masks.npy")
    assert masks.shape == (len(plan), 64, 64) and 0.02 < masks.mean() < 0.9
    assert (tiles.labels == 1).all()
    # the service's tissue mask at every tile pixel: the white glass between the pieces is off it
    tissue = np.load(tiles.folder / "tissue.npy")
    gray = cached.mean(axis=-1)
    assert tissue.shape == masks.shape and 0.2 < tissue.mean() < 0.95
    assert gray[~tissue].mean() > 235 > gray[tissue].mean() + 20
    # a rerun reuses the cache; other annotations are another key, extracted again and the old entry dropped
    again = extract_slide(entry, tmp_path / "cache", **kwargs)
    assert again.folder == tiles.folder and again.meta["extract_s"] == tiles.meta["extract_s"]
    polys = read_annotations(entry.annotations)
    changed = tmp_path / "one.geojson"
    changed.write_text(json.dumps({"type": "FeatureCollection", "features": [json.loads(
        (entry.annotations).read_text())["features"][0]]}))
    other = extract_slide(SlideEntry(entry.id, entry.path, entry.label, changed, None, None, 1), tmp_path / "cache",
                          **kwargs)
    assert other.folder != tiles.folder and not tiles.folder.exists()
    assert np.load(other.folder / "masks.npy").sum() < masks.sum() and len(select_classes(polys, ["gland"])) > 1


def test_label_from_annotation_keeps_positive_tiles_inside_regions(mosaics: Path, tmp_path: Path) -> None:
    entries = read_manifest(mosaics, CLASSES)
    kwargs = {"class_names": CLASSES, "input_mpp": 2.0, "input_size": 64, "label_from": "annotation",
              "positive_class": "malignant", "annotation_classes": ("Gland",), "progress": False}
    neg, pos = (extract_slide(e, tmp_path, **kwargs) for e in entries)
    assert (neg.labels == 0).all()
    masks = np.load(pos.folder / "masks.npy").reshape(pos.n_tiles, -1).mean(axis=1)
    np.testing.assert_array_equal(pos.labels == 1, masks >= 0.5)
    assert 0 < (pos.labels == 1).sum() < pos.n_tiles
    source = TileSource([neg, pos], {neg.entry.id: "train", pos.entry.id: "train"})
    assert len(source.records) == neg.n_tiles + int((pos.labels == 1).sum())
    sample = source.load([source.records[-1].name])[0]
    assert sample.image.shape == (64, 64, 3) and sample.mask is not None and sample.record.label == 1


def _meta_dict() -> dict:
    return read_model_metadata(REPO_ROOT / "model" / "weights" / "pixelcam-glas-lite0-s5.onnx").to_dict()


def test_context_margin_keeps_the_service_tile_at_the_centre(mosaics: Path, tmp_path: Path) -> None:
    """Byte for byte when the read is an integer multiple of the input (here 2 x: 1.2401 µm/px on a 0.62005 scan);
    otherwise the same pixels resampled on a grid shifted by less than a pixel."""
    entry = read_manifest(mosaics, CLASSES)[0]
    kwargs = {"class_names": CLASSES, "input_mpp": 1.2401, "input_size": 64, "label_from": "slide",
              "positive_class": "malignant", "annotation_classes": ("Gland",), "progress": False}
    plain = extract_slide(entry, tmp_path / "a", **kwargs)
    wide = extract_slide(entry, tmp_path / "b", margin=16, **kwargs)
    tiles, ctx = np.load(plain.folder / "tiles.npy"), np.load(wide.folder / "tiles.npy")
    assert ctx.shape == (plain.n_tiles, 96, 96, 3) and wide.n_tiles == plain.n_tiles
    np.testing.assert_array_equal(ctx[:, 16:80, 16:80], tiles)
    masks, ctx_masks = np.load(plain.folder / "masks.npy"), np.load(wide.folder / "masks.npy")
    assert (ctx_masks[:, 16:80, 16:80] == masks).mean() > 0.995  # rasterised per window: edge pixels may differ
    assert ctx_masks.sum() > masks.sum()
    source = TileSource([wide], {wide.entry.id: "train"})
    sample = source.load([source.records[0].name])[0]
    assert sample.image.shape == (96, 96, 3) and sample.tissue is not None and sample.tissue.shape == (96, 96)
