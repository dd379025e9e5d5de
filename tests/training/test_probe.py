"""The layer probe: a feature that carries the mask scores near 100 on held-out images, noise near chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data import Record, Sample
from training.probe import probe_layer


def _samples(n: int, size: int = 64) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(0, size // 2, 2)
        mask[y : y + size // 2, x : x + size // 2] = True
        out.append(Sample(Record(f"im{i}", Path("none"), None, 0, "train"),
                          np.zeros((size, size, 3), np.uint8), mask))
    return out


def test_a_feature_carrying_the_mask_is_found_and_noise_is_not() -> None:
    samples, stride = _samples(8), 8
    gen = torch.Generator().manual_seed(0)
    informative, noise = [], []
    for s in samples:
        cells = torch.from_numpy(s.mask.astype(np.float32)).view(8, 8, 8, 8).mean(dim=(1, 3))
        informative.append(torch.stack([cells, torch.rand(8, 8, generator=gen)]))
        noise.append(torch.rand(2, 8, 8, generator=gen))
    good, bad = probe_layer(samples, informative, stride), probe_layer(samples, noise, stride)
    assert good["pxap_held_out"] > 95
    fg = 100 * np.mean([s.mask.mean() for s in samples])
    assert abs(bad["pxap_held_out"] - fg) < 10 and good["pxap_held_out"] > bad["pxap_held_out"] + 30


def test_seed_shares_are_perfect_for_the_mask_itself_and_chance_for_noise() -> None:
    from training.diagnose import seed_shares

    rng = np.random.default_rng(1)
    masks = [s.mask for s in _samples(6)]
    perfect = seed_shares([m.astype(np.float32) for m in masks], masks, fg_power=8.0, bg_area_frac=0.2)
    noise = seed_shares([rng.random(m.shape) for m in masks], masks, fg_power=1.0, bg_area_frac=0.2)
    fg = 100 * np.mean([m.mean() for m in masks])
    assert perfect[0] > 99 and perfect[1] > 99
    assert abs(noise[0] - fg) < 10 and abs(noise[1] - (100 - fg)) < 10
