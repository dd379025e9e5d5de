"""Compare two ONNX artefacts of one model (e.g. fp32 and int8) on GlaS through onnxruntime: science and speed.

Science: the evaluate stage's protocol (training/evaluate.py) run through onnxruntime, one code path for both
files. Each whole test image at the model's scale is padded white to a multiple of the output stride and run
through a copy of the graph whose spatial axes are made symbolic; `fg_prob` is upsampled bilinearly
(half-pixel) to the padded size and cropped back. Reported: test accuracy, PxAP, Dice fg / mIoU at the
artefact's own `fg_threshold` and at the τ that maximises mIoU on valpx; max |Δ| of `class_probs` and `fg_prob`
on real 224 px test crops.
Speed: `Predictor(path, threads)` on the same pre-decoded uint8 batches of 16 test crops, the files alternated
block by block; tiles/s (wall) and CPU-s/tile (process CPU time, all threads), median and range over blocks.

    python -m training.onnx_compare model/weights/pixelcam-glas-resnet18.onnx int8.onnx [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from model.runtime import INPUT_NAME, OUTPUT_NAMES, Predictor, read_model_metadata
from training.config import GLAS_MPP, TrainConfig
from training.data import Sample, default_data_dir, load_glas, load_samples, make_splits
from training.evaluate import SplitResult, pad_to_stride
from training.export_stage import real_tiles
from training.metrics import THRESHOLDS, PixelCounts, accuracy, tau_index

BATCH = 16


def whole_image_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """An onnxruntime session on the artefact with its tile height and width made symbolic (any image size)."""
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    for out in proto.graph.output:
        for d in out.type.tensor_type.shape.dim[2:]:  # fg_prob's map axes
            d.dim_param = "map"
    del proto.graph.value_info[:]  # inferred shapes of the fixed-size graph
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def evaluate_onnx(
    session: ort.InferenceSession, samples: list[Sample], stride: int, pixel_names: set[str] | None = None
) -> SplitResult:
    """training.evaluate.evaluate_split's protocol (pixel map) on an onnxruntime session."""
    counts, preds, labels, n_masked = PixelCounts.empty(), [], [], 0
    for sample in samples:
        h, w = sample.image.shape[:2]
        padded = pad_to_stride(sample.image, stride)
        probs, fg = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(padded[None])})
        preds.append(int(np.argmax(probs[0])))
        labels.append(sample.record.label)
        if sample.mask is not None and (pixel_names is None or sample.record.name in pixel_names):
            up = F.interpolate(
                torch.from_numpy(fg), size=padded.shape[:2], mode="bilinear", align_corners=False
            )
            counts.add(up[0, 0, :h, :w].clamp(0, 1).numpy(), sample.mask)
            n_masked += 1
    return SplitResult(accuracy(np.array(preds), np.array(labels)), counts, len(preds), n_masked)


def science(path: Path, test: list[Sample], valcl: list[Sample], valpx: set[str]) -> dict[str, float]:
    """Test metrics of one artefact, at its own fg_threshold and at the valpx-best τ."""
    meta = read_model_metadata(path)
    session = whole_image_session(path)
    result = evaluate_onnx(session, test, meta.output_stride)
    best = evaluate_onnx(session, valcl, meta.output_stride, valpx).counts.best_index()
    own = result.counts.scores_at(tau_index(meta.fg_threshold))
    at_best = result.counts.scores_at(best)
    return {
        "accuracy": result.accuracy,
        "pxap": result.counts.pxap(),
        "dice_fg": own["dice_fg"],
        "miou": own["miou"],
        "tau": meta.fg_threshold,
        "valpx_tau": float(THRESHOLDS[best]),
        "dice_fg_valpx_tau": at_best["dice_fg"],
        "miou_valpx_tau": at_best["miou"],
    }


def output_diffs(ref: Predictor, other: Predictor, tiles: np.ndarray) -> dict[str, float]:
    """Max and mean |Δ| of both outputs, and how often the class call and the thresholded map agree."""
    a, b = ref.predict(tiles), other.predict(tiles)
    dc, df = np.abs(a.class_probs - b.class_probs), np.abs(a.fg_prob - b.fg_prob)
    tau = ref.metadata.fg_threshold
    return {
        "tiles": len(tiles),
        "class_probs_max": float(dc.max()),
        "class_probs_mean": float(dc.mean()),
        "fg_prob_max": float(df.max()),
        "fg_prob_mean": float(df.mean()),
        "class_agreement": float(np.mean(a.class_probs.argmax(1) == b.class_probs.argmax(1))),
        "fg_mask_agreement": float(np.mean((a.fg_prob >= tau) == (b.fg_prob >= tau))),
    }


def speed(predictors: dict[str, Predictor], batches: list[np.ndarray], rounds: int) -> dict[str, Any]:
    """Blocks of `batches`, the predictors alternated each round; tiles/s and CPU-s/tile per block."""
    for p in predictors.values():
        p.predict(batches[0])  # warm-up
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
    n = sum(len(b) for b in batches)
    for _ in range(rounds):
        for name, p in predictors.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                p.predict(batch)
            blocks[name].append((n / (time.perf_counter() - wall), (time.process_time() - cpu) / n))
    out: dict[str, Any] = {}
    for name, rows in blocks.items():
        tps, cps = [r[0] for r in rows], [r[1] for r in rows]
        out[name] = {
            "tiles_per_s": statistics.median(tps),
            "tiles_per_s_range": [min(tps), max(tps)],
            "cpu_s_per_tile": statistics.median(cps),
            "cpu_s_per_tile_range": [min(cps), max(cps)],
            "blocks": len(rows),
            "tiles_per_block": n,
        }
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.onnx_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ref", type=Path, help="reference artefact (e.g. the fp32 demo model)")
    parser.add_argument("other", type=Path, help="artefact to compare (e.g. its int8 version)")
    parser.add_argument("--data-dir", type=Path, default=None, help="GlaS folder (default: shared data/glas)")
    defaults = TrainConfig()
    parser.add_argument("--source-mpp", type=float, default=GLAS_MPP, help="GlaS microns per pixel")
    parser.add_argument("--seed", type=int, default=0, help="split seed (the demo model's: 0)")
    parser.add_argument("--valcl-frac", type=float, default=defaults.valcl_frac)
    parser.add_argument("--valpx-per-class", type=int, default=defaults.valpx_per_class)
    parser.add_argument("--rounds", type=int, default=6, help="speed blocks per artefact (0: skip speed)")
    parser.add_argument("--batches", type=int, default=8, help="batches of 16 tiles per speed block")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for speed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print a JSON report: science of both artefacts, output differences, speed."""
    args = _parser().parse_args(argv)
    meta = read_model_metadata(args.ref)
    if read_model_metadata(args.other).input_size != meta.input_size:
        raise SystemExit("the two artefacts take different tile sizes: not two versions of one model")
    records = load_glas(args.data_dir or default_data_dir() / "glas")
    splits = make_splits(
        records, seed=args.seed, valcl_frac=args.valcl_frac, valpx_per_class=args.valpx_per_class
    )
    scale = args.source_mpp / meta.input_mpp
    test = load_samples(records, splits["test"], scale=scale)
    valcl = load_samples(records, splits["valcl"], scale=scale)
    names = {"ref": args.ref, "other": args.other}
    report: dict[str, Any] = {"files": {k: str(v) for k, v in names.items()}}
    report["science"] = {k: science(p, test, valcl, set(splits["valpx"])) for k, p in names.items()}
    tiles = real_tiles(test, meta.input_size, 2 * len(test))
    preds = {
        k: Predictor(p, providers=["CPUExecutionProvider"], threads=args.threads) for k, p in names.items()
    }
    report["output_diffs_on_test_crops"] = output_diffs(preds["ref"], preds["other"], tiles)
    if args.rounds > 0:
        reps = np.concatenate([tiles] * (1 + BATCH * args.batches // len(tiles)))[: BATCH * args.batches]
        batches = [np.ascontiguousarray(reps[i : i + BATCH]) for i in range(0, len(reps), BATCH)]
        report["speed"] = speed(preds, batches, args.rounds)
        ref_cpu = report["speed"]["ref"]["cpu_s_per_tile"]
        report["speed"]["other_speedup_per_cpu_s"] = ref_cpu / report["speed"]["other"]["cpu_s_per_tile"]
        report["speed"]["threads"] = args.threads
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
