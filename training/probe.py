"""Which encoder layer can a 1x1 pixel head read the foreground from? A linear probe per layer, on valcl.

For each chosen layer, the features of every valcl image (whole image at the model scale, as `evaluate` runs it)
are taken at feature resolution, a logistic regression is fit on the true masks of every other image (area-
downsampled to the cells, > 0.5 = foreground) and scored as PxAP on the images it did not see, upsampled as the
evaluation upsamples maps. It is an upper bound of what a 1x1 head on that layer could learn from perfect labels
of a handful of images, never a training signal: it reads only the run's valcl split, never test.

    python -m training.probe RUN_DIR [--checkpoint PATH | --imagenet] [--blocks 4,7,10,14]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.network import PixelCAM, build_model
from training.config import load_yaml, make_config
from training.data import Sample
from training.evaluate import pad_to_stride, to_input
from training.metrics import PixelCounts
from training.stages import load_encoder_weights, model_config, prepare_run

__all__ = ["layer_features", "main", "probe_layer"]

logger = logging.getLogger(__name__)


def layer_features(model: PixelCAM, samples: list[Sample], blocks: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per image: {"head": the heads' feature map, "block<i>": the output of encoder block i}, (C, h, w) each."""
    taps: dict[int, torch.Tensor] = {}
    hooks = [model.encoder.blocks[i].register_forward_hook(  # type: ignore[index]
        lambda _m, _a, out, i=i: taps.__setitem__(i, out)) for i in blocks]
    out = []
    try:
        model.eval()
        for s in samples:
            x = to_input(pad_to_stride(s.image, model.config.output_stride)[None], model.config.mean, model.config.std)
            with torch.no_grad():
                feats = model(x).features[0]
            out.append({"head": feats, **{f"block{i}": taps[i][0] for i in blocks}})
    finally:
        for h in hooks:
            h.remove()
    return out


def _cells(mask: np.ndarray, stride: int, size_hw: tuple[int, int]) -> torch.Tensor:
    m = pad_to_stride(np.repeat(mask[..., None].astype(np.uint8), 3, axis=2), stride)[..., 0].astype(np.float32)
    return (F.interpolate(torch.from_numpy(m)[None, None], size=size_hw, mode="area")[0, 0] > 0.5).float().ravel()


def probe_layer(samples: list[Sample], feats: list[torch.Tensor], stride: int, iters: int = 300) -> dict[str, float]:
    """Fit on the even-indexed images' masks, score PxAP on both halves."""
    fit, held = list(range(0, len(samples), 2)), list(range(1, len(samples), 2))
    x = torch.cat([feats[i].flatten(1).T for i in fit])
    y = torch.cat([_cells(samples[i].mask, stride, tuple(feats[i].shape[1:])) for i in fit])  # type: ignore[arg-type]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(iters):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin((x - mu) / sd)[:, 0], y).backward()
        opt.step()
    scores = {}
    for name, part in (("fit", fit), ("held_out", held)):
        counts = PixelCounts.empty()
        for i in part:
            s, f = samples[i], feats[i]
            h, w = s.image.shape[:2]
            with torch.no_grad():
                p = torch.sigmoid(lin((f.flatten(1).T - mu) / sd)[:, 0]).view(1, 1, *f.shape[1:])
            size = (f.shape[1] * stride, f.shape[2] * stride)
            counts.add(F.interpolate(p, size=size, mode="bilinear", align_corners=False)[0, 0, :h, :w].numpy(), s.mask)
        scores[f"pxap_{name}"] = round(counts.pxap(), 2)
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory (its config.yaml and splits.json are used)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint of the run (default: none)")
    src.add_argument("--imagenet", action="store_true", help="the config's encoder with its ImageNet weights")
    ap.add_argument("--blocks", default="", help="comma-separated EfficientNet-Lite block indices to probe too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = make_config(load_yaml(args.run_dir / "config.yaml"))  # the run's resolved config, checked
    torch.set_num_threads(cfg.threads)
    ctx = prepare_run(cfg)
    if args.checkpoint is not None:
        model, _, _ = load_checkpoint(args.checkpoint)
    else:
        if not args.imagenet:
            ap.error("give --checkpoint PATH or --imagenet")
        model = build_model(model_config(cfg))
        load_encoder_weights(model, cfg)
    samples = [s for s in ctx.samples("valcl") if s.mask is not None]
    blocks = [int(b) for b in args.blocks.split(",") if b]
    per_image = layer_features(model, samples, blocks)
    report: dict[str, Any] = {"run_dir": str(args.run_dir), "weights": str(args.checkpoint or "imagenet"),
                              "images": len(samples), "layers": {}}
    for key in per_image[0]:
        feats = [d[key] for d in per_image]
        report["layers"][key] = {"channels": int(feats[0].shape[0]),
                                 **probe_layer(samples, feats, model.config.output_stride)}
    print(json.dumps(report, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
