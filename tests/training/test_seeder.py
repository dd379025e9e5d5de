"""Seeder properties: counts, fg drawn ∝ CAM, bg only from the low-CAM area, ignore elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import GeomAug, Record, Sample, apply_geom, make_train_batch
from training.pseudo_labels import BG, FG, IGNORE_INDEX, sample_seeds


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_counts_and_ignore_elsewhere() -> None:
    cam = torch.zeros(3, 64, 64)
    cam[:, 16:48, 16:48] = torch.rand(3, 32, 32) * 0.5 + 0.5  # a hot square; the rest is 0 (the low area)
    seeds = sample_seeds(cam, n_fg=5, n_bg=5, bg_area_frac=0.2, generator=_gen())
    assert seeds.shape == (3, 64, 64) and seeds.dtype == torch.int64
    for s in seeds:
        assert int((s == FG).sum()) == 5
        assert int((s == BG).sum()) == 5
        assert int((s == IGNORE_INDEX).sum()) == 64 * 64 - 10
        assert set(torch.unique(s).tolist()) == {IGNORE_INDEX, BG, FG}


def test_fg_drawn_proportional_to_cam() -> None:
    cam = torch.full((1, 32, 32), 0.25)
    cam[:, :, :16] = 0.75  # left half is 3x as likely per pixel
    left = total = 0
    gen = _gen(1)
    for _ in range(400):
        s = sample_seeds(cam, n_fg=5, n_bg=0, generator=gen)[0]
        fg = s == FG
        left += int(fg[:, :16].sum())
        total += int(fg.sum())
    assert total == 2000
    assert 0.72 < left / total < 0.78  # expected 0.75; the std of the estimate is ~0.01


def test_fg_power_draws_closer_to_the_peaks() -> None:
    cam = torch.full((1, 32, 32), 0.25)
    cam[:, :, :16] = 0.75  # per pixel 3x as likely with power 1, 3^4 = 81x with power 4
    gen = _gen(2)
    left = sum(int((sample_seeds(cam, n_fg=1, n_bg=0, fg_power=4.0, generator=gen)[0] == FG)[:, :16].sum())
               for _ in range(1000))
    assert 0.97 < left / 1000 <= 1.0  # expected 81 / 82 = 0.988
    with pytest.raises(ValueError, match="fg_power"):
        sample_seeds(cam, fg_power=0.0)


def test_bg_only_from_lowest_area() -> None:
    gen = _gen(2)
    n_bg = 0
    for _ in range(50):
        cam = torch.rand(2, 40, 40, generator=gen)
        seeds = sample_seeds(cam, n_fg=5, n_bg=5, bg_area_frac=0.2, generator=gen)
        for c, s in zip(cam, seeds, strict=True):
            cutoff = torch.sort(c.flatten()).values[int(0.2 * 1600) - 1]
            n_bg += int((s == BG).sum())  # 5, unless a fg draw landed on a bg seed (both dropped)
            assert bool((c[s == BG] <= cutoff).all())
    assert 480 <= n_bg <= 500


def test_bg_area_fraction_option_widens_the_pool() -> None:
    cam = torch.linspace(0, 1, 100).view(1, 10, 10)
    gen = _gen(3)
    seen = set()
    for _ in range(300):
        s = sample_seeds(cam, n_fg=0, n_bg=5, bg_area_frac=0.4, generator=gen)[0]
        seen |= set(torch.nonzero(s.flatten() == BG).flatten().tolist())
    assert seen == set(range(40))  # uniform over exactly the 40 lowest pixels


def test_pixel_drawn_as_both_is_dropped() -> None:
    cam = torch.full((1, 2, 2), 0.5)
    # 4 fg seeds take every pixel; the 2 bg seeds (lowest half) therefore collide and are dropped from both
    s = sample_seeds(cam, n_fg=4, n_bg=5, bg_area_frac=0.5, generator=_gen())[0]
    assert int((s == FG).sum()) == 2
    assert int((s == BG).sum()) == 0
    assert int((s == IGNORE_INDEX).sum()) == 2


def test_seeds_resampled_each_call() -> None:
    cam = torch.rand(1, 32, 32)
    gen = _gen(4)
    a, b = sample_seeds(cam, generator=gen), sample_seeds(cam, generator=gen)
    assert not torch.equal(a, b)


def test_same_geometric_augmentation_for_image_and_cam() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    cam = image[..., 0].astype(np.float32) / 255.0  # stride 1: the CAM is at image resolution
    sample = Sample(Record("a", None, None, 1, "train"), image)  # type: ignore[arg-type]
    for _ in range(30):
        images, labels, cams = make_train_batch(
            [sample], np.array([0, 0]), rng, size=48, cams={"a": cam}, stride=1, jitter=0.0
        )
        assert cams is not None and labels.tolist() == [1, 1]
        for img, c in zip(images, cams, strict=True):
            np.testing.assert_allclose(c, img[..., 0] / 255.0, atol=1e-6)


def test_colour_jitter_leaves_the_cam_alone() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    cam = rng.random((64, 64)).astype(np.float32)
    sample = Sample(Record("a", None, None, 0, "train"), image)  # type: ignore[arg-type]
    state = np.random.default_rng(5)
    _, _, jittered = make_train_batch([sample], np.array([0]), state, size=64, cams={"a": cam}, stride=1, jitter=0.5)
    state = np.random.default_rng(5)
    _, _, plain = make_train_batch([sample], np.array([0]), state, size=64, cams={"a": cam}, stride=1, jitter=0.0)
    assert jittered is not None and plain is not None
    np.testing.assert_array_equal(jittered, plain)


def test_apply_geom_pads_small_images_with_fill() -> None:
    image = np.zeros((10, 12), dtype=np.float32)
    out = apply_geom(image, GeomAug(0, 0, False, False, 0), 16, fill=7.0)
    assert out.shape == (16, 16)
    assert (out[:10, :12] == 0).all() and (out[10:] == 7).all() and (out[:, 12:] == 7).all()


def test_negative_cells_are_never_seeds_and_bg_is_a_share_of_the_rest() -> None:
    """Slide tiles mark glass off the tissue mask -1: fg and bg seeds come from tissue only."""
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(4, 16, 16, generator=g)
    cam[:, :, :10] = -1.0  # 160 of 256 cells are glass
    for _ in range(20):
        seeds = sample_seeds(cam, n_fg=5, n_bg=5, bg_area_frac=0.25, fg_power=2.0, generator=g)
        on_glass = seeds[:, :, :10]
        assert (on_glass == IGNORE_INDEX).all()
        n_fg, n_bg = (seeds == 1).sum(dim=(1, 2)), (seeds == 0).sum(dim=(1, 2))
        assert (n_fg >= 4).all() and (n_bg >= 4).all() and (n_fg + n_bg >= 8).all()  # a pixel drawn as both drops
        # bg seeds are among the lowest quarter of the 96 tissue cells (24 cells)
        tissue = cam[:, :, 10:].reshape(4, -1)
        cut = torch.sort(tissue, dim=1).values[:, 23]
        bg_values = [cam[i][seeds[i] == 0] for i in range(4)]
        assert all((v <= cut[i]).all() for i, v in enumerate(bg_values))
    empty = sample_seeds(torch.full((1, 4, 4), -1.0), generator=g)
    assert (empty == IGNORE_INDEX).all()
