"""Seeds for the pixel head: sampled afresh every iteration from the stored baseline CAMs."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -255
FG, BG = 1, 0


def sample_seeds(
    cams: torch.Tensor,
    *,
    n_fg: int = 5,
    n_bg: int = 5,
    bg_area_frac: float = 0.2,
    fg_power: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Seed labels (B, H, W) int64 from CAMs (B, H, W) in [0, 1]: 1 = fg, 0 = bg, -255 = ignore.

    Foreground: `n_fg` distinct pixels drawn with probability ∝ CAM^fg_power + 1e-6 (1 = the paper's seeder; a
    larger power draws closer to the CAM's peaks). Background: `n_bg` distinct pixels drawn uniformly among the
    `bg_area_frac` lowest-CAM pixels. A pixel drawn as both is dropped. Pixels whose CAM is negative (glass off
    the tissue mask, with dataset slides) are never seeds; `bg_area_frac` is then a share of the others.
    """
    if cams.ndim != 3:
        raise ValueError(f"cams must be (B, H, W), got shape {tuple(cams.shape)}")
    if not 0 < bg_area_frac <= 1:
        raise ValueError(f"bg_area_frac must be in (0, 1], got {bg_area_frac}")
    if not fg_power > 0:
        raise ValueError(f"fg_power must be > 0, got {fg_power}")
    b, h, w = cams.shape
    flat = torch.nan_to_num(cams.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).reshape(b, h * w)
    seeds = torch.full((b, h * w), IGNORE_INDEX, dtype=torch.int64, device=cams.device)
    valid = flat >= 0
    for i in range(b):
        n_valid = int(valid[i].sum())
        if n_valid == 0:
            continue
        n_low = max(1, int(bg_area_frac * n_valid))
        k_fg, k_bg = min(n_fg, n_valid), min(n_bg, n_low)
        weights = torch.where(valid[i], flat[i].clamp_min(0).pow(fg_power) + 1e-6, torch.zeros_like(flat[i]))
        fg_idx = (
            torch.multinomial(weights, k_fg, replacement=False, generator=generator)
            if k_fg > 0
            else torch.empty(0, dtype=torch.int64, device=cams.device)
        )
        ranked = torch.where(valid[i], flat[i], torch.full_like(flat[i], float("inf")))
        low = torch.argsort(ranked, stable=True)[:n_low]
        pick = torch.randperm(n_low, generator=generator, device=cams.device)[:k_bg]
        bg_idx = low[pick]
        seeds[i, fg_idx] = FG
        seeds[i, bg_idx] = BG
        both = fg_idx[torch.isin(fg_idx, bg_idx)]
        seeds[i, both] = IGNORE_INDEX
    return seeds.reshape(b, h, w)
