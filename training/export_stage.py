"""Stage export: the PixelCAM checkpoint as one self-describing .onnx, checked for parity on real test tiles."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from model.export import check_parity, export_onnx
from model.network import PixelCAM
from model.runtime import Predictor
from training.data import WHITE, GeomAug, Sample, apply_geom
from training.evaluate import evaluate_split, to_input
from training.metrics import THRESHOLDS
from training.report import fmt, read_report, write_report
from training.slide_data import annotation_names
from training.slide_eval import evaluate_as_slides, evaluate_slide_entries
from training.stages import RunContext, StageError, export_checkpoint

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-4


def real_tiles(samples: list[Sample], size: int, n: int) -> np.ndarray:
    """Up to `n` uint8 (S, S, 3) tiles: top-left and centre crops of real images at the model's scale."""
    tiles = []
    for sample in samples:
        h, w = sample.image.shape[:2]
        for top, left in ((0, 0), (max(0, (h - size) // 2), max(0, (w - size) // 2))):
            tiles.append(apply_geom(sample.image, GeomAug(top, left, False, False, 0), size, WHITE))
            if len(tiles) == n:
                return np.stack(tiles)
    return np.stack(tiles)


def _tau(ctx: RunContext, model: PixelCAM) -> float:
    """τ from the evaluate stage (max mIoU on valpx), recomputed on valpx when that stage has not run."""
    report = read_report(ctx.run_dir / "evaluate")
    if report:
        return float(report["results"]["pixelcam"]["tau"])
    val = evaluate_split(model, ctx.samples("valcl"), mode="pixel", pixel_names=set(ctx.splits["valpx"]))
    return float(THRESHOLDS[val.counts.best_index()])


def _metrics(ctx: RunContext) -> dict[str, Any]:
    """Test and validation numbers of both models, for the provenance block."""
    report = read_report(ctx.run_dir / "evaluate")
    out: dict[str, Any] = {}
    for name, r in report.get("results", {}).items():
        out[name] = {
            "test_accuracy": r["test"]["accuracy"],
            "test_pxap": r["test"].get("pxap"),
            "test_dice_fg": r["test"].get("dice_fg"),
            "test_miou": r["test"].get("miou"),
            "valpx_pxap": r["valpx"].get("pxap"),
            "valcl_accuracy": r["valcl"]["accuracy"],
            "tau": r["tau"],
        }
    return out


def _slide_path_scores(ctx: RunContext, predictor: Predictor) -> dict[str, Any]:
    """The exported model on the test split as users meet it (`training.slide_eval`), also written into
    evaluate/report.json beside the whole-image numbers. Images are written as slides first; the slides of
    dataset slides are analysed as they are, scored against their annotations."""
    split = ctx.eval_split
    with tempfile.TemporaryDirectory(prefix="pixelcam-slide-path-") as work:
        if ctx.cfg.dataset == "slides":
            result = evaluate_slide_entries(
                predictor, ctx.slides_of(split), Path(work),
                annotation_classes=annotation_names(ctx.cfg.foreground_name, ctx.cfg.positive_class), progress=False)
        else:
            names = set(ctx.splits[split])
            records = [r for r in ctx.records if r.name in names]
            result = evaluate_as_slides(predictor, records, Path(work), mpp=ctx.cfg.source_mpp, progress=False)
    scores = {k: v for k, v in result.to_dict().items() if k != "images"}
    scores["split"] = split
    scores["images"] = [{k: row[k] for k in ("name", "label", "predicted", "probability", "pxap") if k in row}
                        for row in result.rows]
    evaluate_dir = ctx.run_dir / "evaluate"
    report = read_report(evaluate_dir)
    if report:
        report["slide_path"] = {k: v for k, v in scores.items() if k != "images"}
        summary = (evaluate_dir / "summary.md").read_text() if (evaluate_dir / "summary.md").is_file() else ""
        what = (f"the {split} slides of the manifest" if ctx.cfg.dataset == "slides"
                else f"{split} images written as slides at {ctx.cfg.source_mpp} µm/px")
        summary += (f"\n\nSlide path (the exported ONNX, {what}, analysed by analyze_slide with default options): "
                    f"accuracy {fmt(scores['accuracy'], 1)} %, PxAP {fmt(scores['pxap'])} %.")
        write_report(evaluate_dir, report, summary)
    return scores


def run_export(ctx: RunContext) -> dict[str, Any]:
    """Export the stage-3 checkpoint (best_localization.pt, or best_balanced.pt with export_select balanced), run
    onnx checks and torch-vs-onnxruntime parity, copy if asked."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ckpt = export_checkpoint(ctx)
    if not ckpt.is_file():
        raise StageError(f"{ckpt} not found: run --stage pixelcam first (same --run-dir)")
    model, mcfg, payload = load_checkpoint(ckpt)
    tau = min(max(_tau(ctx, model), 0.001), 0.999)
    provenance = {
        "dataset": (f"slides: {len(ctx.slide_split_ids['train'])} training slides ({len(ctx.splits['train'])} tiles, "
                    f"labels from the {cfg.label_from}, split seed {cfg.seed}) at {cfg.input_mpp} µm/px"
                    if cfg.dataset == "slides" else
                    f"{cfg.dataset}: {len(ctx.splits['train'])} training images "
                    f"(split seed {cfg.seed}) resampled to {cfg.input_mpp} µm/px"),
        "train_config_sha256": cfg.sha256(),
        "metrics": _metrics(ctx),
        "checkpoint": {"stage": "pixelcam", "selection": (
                           f"best_balanced (valpx PxAP within {cfg.balanced_margin} points of the best valcl accuracy)"
                           if cfg.export_select == "balanced" else "best_localization (valpx PxAP)"),
                       "epoch": payload.get("extra", {}).get("row", {}).get("epoch")},
        "trained_from": (f"fine-tuned from {cfg.init_from}" if cfg.init_from
                         else cfg.pretrained or "scratch (no pretrained weights)"),
    }
    out_dir = ctx.run_dir / "export"
    path = export_onnx(model, mcfg, out_dir / cfg.onnx_name, fg_threshold=tau, provenance=provenance)
    predictor = Predictor(path, providers=["CPUExecutionProvider"])  # export_onnx already validated the file
    tiles = real_tiles(ctx.samples(ctx.eval_split), mcfg.input_size, 8)
    parity = check_parity(model, path, tiles, atol=PARITY_ATOL)
    # an independent reference: the training code's own preprocessing, not the export wrapper's
    with torch.no_grad():
        out = model.eval()(to_input(tiles, mcfg.mean, mcfg.std))
    pred = predictor.predict(tiles)
    parity["class_probs_vs_training_path"] = float(
        np.abs(pred.class_probs - torch.softmax(out.class_logits, 1).numpy()).max()
    )
    parity["fg_prob_vs_training_path"] = float(
        np.abs(pred.fg_prob - torch.softmax(out.fg_logits, 1)[:, 1].numpy()).max()
    )
    if max(parity.values()) > PARITY_ATOL:
        raise StageError(f"ONNX parity failed on real tiles: {parity}; the export does not match training")
    slide_path = _slide_path_scores(ctx, predictor)
    copied = None
    if cfg.copy_to:
        dest = Path(cfg.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        copied = str(shutil.copy2(path, dest / path.name))
    wall = time.perf_counter() - t0
    report = {
        "stage": "export",
        "onnx": str(path),
        "bytes": path.stat().st_size,
        "fg_threshold": tau,
        "metadata": predictor.metadata.to_dict(),
        "parity_max_abs_diff": parity,
        "parity_tiles": int(len(tiles)),
        "slide_path": slide_path,
        "copied_to": copied,
        "wall_s": wall,
    }
    summary = (
        f"# Stage export\n\n`{path}` ({path.stat().st_size / 1e6:.2f} MB), fg_threshold τ = {tau:.3f} (from valpx). "
        f"onnx.checker and the runtime's metadata check passed. Parity on {len(tiles)} real test tiles "
        f"(max |onnxruntime − torch|): " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
        + f". Slide path (test images as slides through analyze_slide, default options): accuracy "
        f"{fmt(slide_path.get('accuracy'), 1)} %, PxAP {fmt(slide_path.get('pxap'))} %. Copied to: {copied or '-'}. "
        f"Wall time {fmt(wall, 1)} s."
    )
    write_report(out_dir, report, summary)
    return report
