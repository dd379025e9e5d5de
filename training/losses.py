"""Losses: image cross-entropy and the partial (seed-only) cross-entropy of the pixel head."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from training.pseudo_labels import IGNORE_INDEX

logger = logging.getLogger(__name__)


def partial_ce(fg_logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Mean CE over all labelled pixels of the batch; logits (B, 2, h, w) are upsampled to seeds (B, H, W).

    A batch without any labelled pixel gives a zero that still belongs to the graph, so backward works.
    """
    if fg_logits.shape[-2:] != seeds.shape[-2:]:
        fg_logits = F.interpolate(fg_logits, size=seeds.shape[-2:], mode="bilinear", align_corners=False)
    labelled = seeds != IGNORE_INDEX
    if not bool(labelled.any()):
        return fg_logits.sum() * 0.0
    return F.cross_entropy(fg_logits, seeds, ignore_index=IGNORE_INDEX, reduction="mean")
