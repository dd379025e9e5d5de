"""Whole-image inference and split evaluation: accuracy, pooled PxAP, Dice/mIoU at a valpx threshold.

The fully convolutional network runs on each whole resampled image (`in_` plane), padded with white to a
multiple of the output stride; maps come back at `fm_` resolution of the padded image, are upsampled
bilinearly (half-pixel) to the padded size and cropped back to the image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.network import PixelCAM
from training.data import WHITE, Sample
from training.metrics import PixelCounts, accuracy

logger = logging.getLogger(__name__)

MAP_MODES = ("cam", "layercam", "pixel")


def to_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> normalised float32 (B, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def pad_to_stride(image: np.ndarray, stride: int) -> np.ndarray:
    """Pad an (H, W, 3) image with white on the bottom/right to multiples of `stride`."""
    h, w = image.shape[:2]
    ph, pw = math.ceil(h / stride) * stride - h, math.ceil(w / stride) * stride - w
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=WHITE)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of (B, h, w) to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(1e-12)
    return ((flat - lo[:, None]) / span[:, None]).view_as(maps)


def layercam(features: torch.Tensor, logits: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
    """LayerCAM on the last feature map: ReLU(Σ_c ReLU(∂y_k/∂A_c) · A_c), (B, h, w)."""
    score = logits.gather(1, class_idx.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, features, retain_graph=False)
    return F.relu((F.relu(grad) * features).sum(dim=1))


def fm_maps(model: PixelCAM, x: torch.Tensor, class_idx: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (B, K) and a localisation map (B, h, w) in [0, 1] at feature resolution."""
    if mode not in MAP_MODES:
        raise ValueError(f"map mode must be one of {MAP_MODES}, got {mode!r}")
    if mode == "layercam":
        with torch.enable_grad():
            out = model(x)
            maps = layercam(out.features, out.class_logits, class_idx)
        return out.class_logits.detach(), minmax(maps.detach())
    with torch.no_grad():
        out = model(x)
        if mode == "pixel":
            return out.class_logits, torch.softmax(out.fg_logits, dim=1)[:, 1]
        return out.class_logits, minmax(model.cam(out.features, class_idx))


def predict_image(model: PixelCAM, sample: Sample, *, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits (K,), the fm map of the padded image (h, w) and the map at image size (H, W).

    Stride and normalisation come from the model's own config.
    """
    cfg = model.config
    h, w = sample.image.shape[:2]
    padded = pad_to_stride(sample.image, cfg.output_stride)
    x = to_input(padded[None], cfg.mean, cfg.std)
    label = torch.tensor([sample.record.label])
    logits, fm = fm_maps(model, x, label, mode)
    up = F.interpolate(fm[:, None], size=padded.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    full = up[:h, :w].clamp(0, 1)
    return logits[0].numpy(), fm[0].numpy(), full.numpy()


@dataclass
class SplitResult:
    """Everything measured on one split with one map mode."""

    accuracy: float
    counts: PixelCounts
    n_images: int
    n_masked: int
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # fm maps of the padded images, when kept

    def summary(self, tau_index: int | None = None) -> dict[str, Any]:
        """JSON-ready metrics; Dice/mIoU at `tau_index` when given."""
        out: dict[str, Any] = {"accuracy": self.accuracy, "n_images": self.n_images, "n_masked": self.n_masked}
        if self.n_masked:
            out["pxap"] = self.counts.pxap()
            n_pos, n_neg = int(self.counts.pos_hist.sum()), int(self.counts.neg_hist.sum())
            out["fg_fraction"] = 100.0 * n_pos / max(1, n_pos + n_neg)  # the PxAP of any constant map
            if tau_index is not None:
                out.update(self.counts.scores_at(tau_index))
        return out


def evaluate_split(
    model: PixelCAM,
    samples: list[Sample],
    *,
    mode: str,
    pixel_names: set[str] | None = None,
    keep_maps: bool = False,
) -> SplitResult:
    """Run the model on every image; pool pixel counts of masked images (only `pixel_names` when given)."""
    was_training = model.training
    model.eval()
    counts = PixelCounts.empty()
    preds: list[int] = []
    maps: dict[str, np.ndarray] = {}
    labels, n_masked = [], 0
    try:
        for sample in samples:
            logits, fm, full = predict_image(model, sample, mode=mode)
            preds.append(int(np.argmax(logits)))
            labels.append(sample.record.label)
            if keep_maps:
                maps[sample.record.name] = fm
            if sample.mask is not None and (pixel_names is None or sample.record.name in pixel_names):
                # slide tiles score 0 off the tissue mask, as the service's heatmap (tissue_only) does
                counts.add(full if sample.tissue is None else np.where(sample.tissue, full, 0.0), sample.mask)
                n_masked += 1
    finally:
        model.train(was_training)
    return SplitResult(accuracy(np.array(preds), np.array(labels)), counts, len(preds), n_masked, maps)
