"""Every shared slide opens or is refused with its specific reason; MPP provenance; generated edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from service.slide.errors import MissingMppError, SlideError, UnsupportedSlideError
from service.slide.wsi import open_slide
from tests.service.synth import tissue_image, write_pyramid

# name -> (l0_size_wh, level count, mpp_x, mpp_source, backend, vendor)
OPENS = {
    "CMU-1-Small-Region.svs": ((2220, 2967), 1, 0.499, "openslide.mpp-x", "openslide", "aperio"),
    "small_16x16.svs": ((16, 16), 1, 0.499, "openslide.mpp-x", "openslide", "aperio"),
    "dicom_boxes/boxes_0.dcm": ((16, 16), 1, 0.499, "openslide.mpp-x", "openslide", "dicom"),
    "dicom_boxes/boxes_1.dcm": ((16, 16), 1, 0.499, "openslide.mpp-x", "openslide", "dicom"),
    "dicom_camelyon16_lowres/multiframe_camelyon_challenge_image.dcm":
        ((1152, 700), 1, 28.969, "openslide.mpp-x", "openslide", "dicom"),
}
# name -> (error type, code, words the message must contain)
REFUSED = {
    "small_vectra.qptiff": (UnsupportedSlideError, "fluorescence", ["fluorescence", "not a brightfield"]),
    "dicom_pathml_small/small_dicom.dcm": (UnsupportedSlideError, "non-conformant-dicom",
                                           ["non-conformant DICOM", "ImageType", "pixel spacing"]),
    "boxes_pyramid.tiff": (MissingMppError, None, ["352.8", "72 dpi", "--mpp", "`mpp`"]),
    "kidney-48-5.tif": (MissingMppError, None, ["no microns-per-pixel", "--mpp", "`mpp`"]),
}


def _all_shared_slides(slides_dir: Path) -> set[str]:
    """Every slide file in the shared folder, relative to it."""
    return {p.relative_to(slides_dir).as_posix() for p in slides_dir.rglob("*") if p.is_file()}


def test_every_shared_slide_is_classified(slides_dir: Path) -> None:
    assert _all_shared_slides(slides_dir) == set(OPENS) | set(REFUSED)


@pytest.mark.parametrize("name", sorted(OPENS))
def test_shared_slide_opens(slides_dir: Path, name: str) -> None:
    size_wh, n_levels, mpp, source, backend, vendor = OPENS[name]
    with open_slide(slides_dir / name) as slide:
        info = slide.info
        assert info.l0_size_wh == size_wh
        assert info.level_count == n_levels
        assert info.mpp_x == pytest.approx(mpp, rel=1e-4)
        assert info.mpp_source == source
        assert (info.backend, info.vendor) == (backend, vendor)
        assert json.loads(json.dumps(info.to_dict()))["l0_size_wh"] == list(size_wh)
        region = slide.read_region((0, 0), 0, (8, 8))
        assert region.shape == (8, 8, 3) and region.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_shared_slide_refused_with_reason(slides_dir: Path, name: str) -> None:
    err_type, code, words = REFUSED[name]
    with pytest.raises(err_type) as info:
        open_slide(slides_dir / name)
    for word in words:
        assert word in str(info.value)
    if code is not None:
        assert info.value.code == code


def test_dicom_series_folder_opens(slides_dir: Path) -> None:
    with open_slide(slides_dir / "dicom_boxes") as slide:
        assert slide.info.format == "dicom" and slide.info.l0_size_wh == (16, 16)


@pytest.mark.parametrize(("name", "backend"), [("kidney-48-5.tif", "tiffslide"), ("boxes_pyramid.tiff", "openslide")])
def test_mpp_override_opens_missing_or_absurd_mpp(slides_dir: Path, name: str, backend: str) -> None:
    with open_slide(slides_dir / name, mpp_override=0.25) as slide:
        assert (slide.info.mpp_x, slide.info.mpp_y, slide.info.mpp_source) == (0.25, 0.25, "override")
        assert slide.info.backend == backend


def test_override_wins_over_metadata_and_absurd_override_refused(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs", mpp_override=0.25) as slide:
        assert slide.info.mpp_source == "override" and slide.info.mpp_x == 0.25
    with pytest.raises(MissingMppError, match="outside the plausible range"):
        open_slide(slides_dir / "CMU-1-Small-Region.svs", mpp_override=500.0)


def test_cmu_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        assert slide.info.objective_power == 20.0
        assert slide.info.bounds is None
        assert slide.info.quickhash == slide.properties["openslide.quickhash-1"]


@pytest.mark.compat
def test_read_region_matches_openslide_and_pads_white(slides_dir: Path) -> None:
    path = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as ref:
        ours = slide.read_region((1000, 1200), 0, (64, 48))
        theirs = np.asarray(ref.read_region((1000, 1200), 0, (64, 48)))[..., :3]
        np.testing.assert_array_equal(ours, theirs)
        edge = slide.read_region((2200, 2950), 0, (40, 40))
        assert (edge[20:, :] == 255).all() and (edge[:, 20:] == 255).all()
        assert edge[:17, :20].mean() < 250
        with pytest.raises(SlideError, match="level 3"):
            slide.read_region((0, 0), 3, (4, 4))


def test_thumbnail_keeps_aspect(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        thumb = slide.thumbnail((256, 256))
        assert thumb.shape == (256, 192, 3)  # 2220 x 256 / 2967 = 191.5
        assert 100 < thumb.mean() < 250


def test_thumbnail_may_enlarge_a_smaller_level_instead_of_shrinking_a_larger_one(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "s.tif", tissue_image(512, 384), unit="CENTIMETER", mpp=0.5)
    with open_slide(path) as slide:
        read: list[int] = []
        real_read = slide.read_region
        slide.read_region = lambda xy, level, size: read.append(level) or real_read(xy, level, size)  # type: ignore[method-assign]
        exact = slide.thumbnail((240, 240))  # needs downsample 2.13: reads level 1 (256 px) and shrinks it
        near = slide.thumbnail((240, 240), max_upscale=1.25)  # level 2 (128 px) would need 1.9x: still level 1
        small = slide.thumbnail((112, 112), max_upscale=1.25)  # level 2 (128 px) needs no enlargement anyway
        close = slide.thumbnail((150, 150), max_upscale=1.25)  # level 2 enlarged 1.17x instead of level 1
        assert read == [1, 1, 2, 2]
        assert exact.shape == near.shape == (180, 240, 3) and small.shape == (84, 112, 3)
        assert close.shape == (112, 150, 3)
        np.testing.assert_array_equal(exact, near)
        assert np.abs(close.astype(int) - slide.thumbnail((150, 150)).astype(int)).mean() < 8


# generated cases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "mpp"), [("CENTIMETER", 0.5), ("INCH", 0.25), ("MILLIMETER", 1.0)])
def test_generated_pyramid_mpp_from_resolution_tags(tmp_path: Path, unit: str, mpp: float) -> None:
    path = write_pyramid(tmp_path / "s.tif", tissue_image(512, 384), unit=unit, mpp=mpp)
    with open_slide(path) as slide:
        assert slide.info.mpp_x == pytest.approx(mpp, rel=1e-5)
        assert slide.info.mpp_source in {"openslide.mpp-x", "tiff.XResolution"}
        assert slide.info.level_sizes_wh == ((512, 384), (256, 192), (128, 96))


def test_generated_pyramid_without_resolution_needs_override(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "nores.tif", tissue_image(256, 256), mpp=None)
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.info.mpp_source == "override"


def test_subifd_pyramid_uses_tiffslide_levels(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "sub.tif", tissue_image(512, 256), subifds=True)
    with open_slide(path) as slide:
        assert slide.info.backend == "tiffslide"
        assert slide.info.level_count == 3
        assert slide.info.mpp_source == "tiff.XResolution"
        region = slide.read_region((400, 200), 1, (100, 100))  # runs past the level's edge
        assert region.shape == (100, 100, 3)
        assert (region[30:, :] == 255).all() and (region[:, 60:] == 255).all()


def test_png_refused_as_not_a_slide(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(UnsupportedSlideError, match="PNG image, not a whole-slide image") as info:
        open_slide(data_dir / "images" / "skimage_ihc.png")
    assert info.value.code == "not-a-slide"


def test_empty_and_random_files_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedSlideError, match="empty") as info:
        open_slide(empty)
    assert info.value.code == "empty-file"
    noise = tmp_path / "noise.svs"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedSlideError, match="not a recognised slide format") as info:
        open_slide(noise)
    assert info.value.code == "not-a-slide"


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_svs_refused(tmp_path: Path, slides_dir: Path, fraction: float) -> None:
    data = (slides_dir / "CMU-1-Small-Region.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(UnsupportedSlideError, match="truncated") as info:
        open_slide(cut)
    assert info.value.code == "truncated"


def test_missing_path_and_folder_without_slides(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnsupportedSlideError, match="folder without .dcm"):
        open_slide(tmp_path)


def test_large_striped_tiff_refused_as_not_tiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    import service.slide.wsi as slides

    path = tmp_path / "striped.tif"
    tifffile.imwrite(path, tissue_image(300, 200), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as slide:  # small striped images are accepted
        assert slide.info.l0_size_wh == (300, 200)
    monkeypatch.setattr(slides, "MAX_UNTILED_PX", 50_000)
    with pytest.raises(UnsupportedSlideError, match="not tiled") as info:
        open_slide(path)
    assert info.value.code == "not-tiled"


# MPP resolution order and sanity, on property dicts ---------------------------------------------------------


def test_mpp_order_openslide_then_vendor_then_tiff_then_tiffslide() -> None:
    from service.slide.metadata import resolve_mpp

    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26", "aperio.MPP": "0.5",
             "tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter", "tiffslide.mpp-x": 0.3}
    assert resolve_mpp(props, None, "s") == (0.25, 0.26, "openslide.mpp-x")
    del props["openslide.mpp-x"]
    assert resolve_mpp(props, None, "s") == (0.5, 0.5, "aperio.MPP")
    del props["aperio.MPP"]
    assert resolve_mpp(props, None, "s") == (0.25, 0.25, "tiff.XResolution")
    del props["tiff.XResolution"]
    assert resolve_mpp(props, None, "s") == (0.3, 0.3, "tiffslide.mpp-x")


def test_mpp_from_dicom_spacing_and_inch_tags() -> None:
    from service.slide.metadata import resolve_mpp

    spacing = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing"
    mpp_x, mpp_y, source = resolve_mpp({f"{spacing}[0]": "0.000243", f"{spacing}[1]": "0.000242"}, None, "d")
    assert (round(mpp_x, 6), round(mpp_y, 6), source) == (0.242, 0.243, "dicom.PixelSpacing")
    inch = {"tiff.XResolution": "101600", "tiff.YResolution": "101600", "tiff.ResolutionUnit": "inch"}
    assert resolve_mpp(inch, None, "t") == (0.25, 0.25, "tiff.XResolution")
    with pytest.raises(MissingMppError, match="72 dpi"):
        resolve_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, None, "screen.tif")


def test_mpp_must_agree_with_objective_power() -> None:
    from service.slide.metadata import resolve_mpp

    # a 40x scan cannot have 2 um pixels; the plausible vendor value behind it is used instead
    props = {"openslide.mpp-x": "2.0", "aperio.MPP": "0.25", "openslide.objective-power": "40"}
    assert resolve_mpp(props, None, "s")[2] == "aperio.MPP"
    del props["aperio.MPP"]
    with pytest.raises(MissingMppError, match="inconsistent with objective power 40x"):
        resolve_mpp(props, None, "s")
    assert resolve_mpp(props, 2.0, "s") == (2.0, 2.0, "override")  # the user's word wins


def test_fsspec_url_opens_through_tiffslide(slides_dir: Path) -> None:
    url = (slides_dir / "CMU-1-Small-Region.svs").resolve().as_uri()
    with open_slide(url) as slide:
        assert slide.info.backend == "tiffslide"
        assert slide.info.mpp_x == pytest.approx(0.499)
        assert slide.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)


def test_damaged_tile_data_raises_slide_error(tmp_path: Path, slides_dir: Path) -> None:
    import tifffile

    data = bytearray((slides_dir / "CMU-1-Small-Region.svs").read_bytes())
    with tifffile.TiffFile(slides_dir / "CMU-1-Small-Region.svs") as tif:
        page = tif.series[0].levels[0].keyframe
        offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
    data[offset:offset + count] = b"\xff" * count
    broken = tmp_path / "broken.svs"
    broken.write_bytes(bytes(data))
    with open_slide(broken) as slide, pytest.raises(SlideError, match="may be damaged"):
        slide.read_region((0, 0), 0, (64, 64))
