"""Validation diagnostics behind the training choices: map PxAP over every valcl mask, and how clean the seeds are.

GlaS gives every `train_*` image a gland mask, so a run's whole valcl split (17 images for the demo splits) can
score a map, not only its valpx subset. Both commands read the run's own splits and never test.

    python -m training.diagnose maps RUN_DIR CHECKPOINT [--mode pixel|cam|layercam] [--smooth 1,3,5]
        PxAP (and accuracy) of the checkpoint's map over all valcl masks, per class and pooled; with --smooth,
        also with the pixel logits averaged over k x k cells after the fact (pixel mode)
    python -m training.diagnose seeds RUN_DIR CHECKPOINT [--mode cam] [--fg-power 1,4,8] [--bg-area-frac 0.1,0.2]
        share of fg seeds that land in glands and of bg seeds that land outside, for the seeder's settings
        (20 draws per image; chance is the glands' share of the pixels, and its complement)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.network import PixelCAM
from training.config import load_yaml, make_config
from training.data import Sample
from training.evaluate import pad_to_stride, predict_image, to_input
from training.metrics import PixelCounts
from training.stages import prepare_run

__all__ = ["main", "map_pxap", "seed_shares"]

logger = logging.getLogger(__name__)


def _smoothed_pixel_map(model: PixelCAM, sample: Sample, k: int) -> np.ndarray:
    """The pixel head's fg probability at image size, its logits averaged over k x k cells first."""
    h, w = sample.image.shape[:2]
    padded = pad_to_stride(sample.image, model.config.output_stride)
    with torch.no_grad():
        logits = model(to_input(padded[None], model.config.mean, model.config.std)).fg_logits
    if k > 1:
        logits = F.avg_pool2d(logits, k, stride=1, padding=k // 2, count_include_pad=False)
    fg = torch.softmax(logits, dim=1)[:, 1:2]
    return F.interpolate(fg, size=padded.shape[:2], mode="bilinear", align_corners=False)[0, 0, :h, :w].numpy()


def map_pxap(model: PixelCAM, samples: list[Sample], mode: str, smooth: int = 1) -> dict[str, float]:
    """Accuracy and PxAP (pooled, benign-only, malignant-only) of one map over every masked sample."""
    per = {0: PixelCounts.empty(), 1: PixelCounts.empty()}
    pooled, right = PixelCounts.empty(), 0
    for s in samples:
        logits, _, full = predict_image(model, s, mode=mode)
        right += int(int(np.argmax(logits)) == s.record.label)
        if smooth > 1:
            full = _smoothed_pixel_map(model, s, smooth)
        if s.mask is not None:
            pooled.add(full, s.mask)
            per.setdefault(s.record.label, PixelCounts.empty()).add(full, s.mask)
    out = {"accuracy": 100.0 * right / max(1, len(samples)), "pxap": pooled.pxap()}
    out.update({f"pxap_class{c}": counts.pxap() for c, counts in per.items()})
    return out


def seed_shares(maps: list[np.ndarray], masks: list[np.ndarray], fg_power: float, bg_area_frac: float,
                n: int = 5, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """(% of fg seeds in the mask, % of bg seeds outside it) for the seeder's draws (fg ∝ map^p, bg uniform
    among the `bg_area_frac` lowest pixels), each map min-max normalised first as the cams stage stores them."""
    rng = np.random.default_rng(seed)
    fg_in, bg_out = [], []
    for m, mask in zip(maps, masks, strict=True):
        flat = m.ravel().astype(np.float64)
        flat = (flat - flat.min()) / max(flat.max() - flat.min(), 1e-12)
        inside = mask.ravel() > 0
        p = flat**fg_power + 1e-6
        p /= p.sum()
        low = np.argsort(flat, kind="stable")[: max(n, int(bg_area_frac * flat.size))]
        for _ in range(draws):
            fg_in.append(inside[rng.choice(flat.size, n, replace=False, p=p)].mean())
            bg_out.append(1.0 - inside[rng.choice(low, n, replace=False)].mean())
    return 100.0 * float(np.mean(fg_in)), 100.0 * float(np.mean(bg_out))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["maps", "seeds"])
    ap.add_argument("run_dir", type=Path, help="a run directory (its config.yaml and splits.json)")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--mode", default=None, help="pixel, cam or layercam (default: pixel for maps, cam for seeds)")
    ap.add_argument("--smooth", default="1", help="maps: comma-separated k for a k x k mean of the pixel logits")
    ap.add_argument("--fg-power", default="1,4,8", help="seeds: comma-separated fg powers")
    ap.add_argument("--bg-area-frac", default="0.1,0.2", help="seeds: comma-separated background areas")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = make_config(load_yaml(args.run_dir / "config.yaml"))  # the run's resolved config, checked
    torch.set_num_threads(cfg.threads)
    samples = [s for s in prepare_run(cfg).samples("valcl") if s.mask is not None]
    model, _, _ = load_checkpoint(args.checkpoint)
    model.eval()
    if args.command == "maps":
        mode = args.mode or "pixel"
        for k in (int(v) for v in _floats(args.smooth)):
            scores = map_pxap(model, samples, mode, smooth=k if mode == "pixel" else 1)
            print(f"{mode} smooth {k}: " + ", ".join(f"{n} {v:.1f}" for n, v in scores.items()))  # noqa: T201
        return 0
    mode = args.mode or "cam"
    maps = [predict_image(model, s, mode=mode)[2] for s in samples]
    masks = [s.mask for s in samples]
    share = 100.0 * float(np.mean(np.concatenate([m.ravel() > 0 for m in masks])))  # type: ignore[union-attr]
    print(f"{len(samples)} valcl images; glands are {share:.1f} % of their pixels")  # noqa: T201
    for power in _floats(args.fg_power):
        for frac in _floats(args.bg_area_frac):
            fg, bg = seed_shares(maps, masks, power, frac)  # type: ignore[arg-type]
            print(f"{mode} fg_power {power:g} bg_area_frac {frac:g}: fg seeds in glands {fg:.1f} %, "  # noqa: T201
                  f"bg seeds outside {bg:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
