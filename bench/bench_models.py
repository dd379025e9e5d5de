"""Model-alone speed of ONNX files on this machine, interleaved: tiles/s in batches and dense regions.

For each model, in alternating rounds: batches of `--batch` real GlaS tiles of 224 px (tiles/s), one
`--region` px square region (tile-equivalents/s = region pixels / 224² per second), and the same region cut to
five shapes in turn (whether a new input shape costs onnxruntime anything). Same threads for every model.

    .venv/bin/python bench/bench_models.py MODEL.onnx [MODEL.onnx ...] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine_info  # noqa: E402
from make_slide import shared_data_dir  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from model.runtime import Predictor  # noqa: E402
from training.data import read_rgb  # noqa: E402

TILE = 224


def _inputs(batch: int, region: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_rgb(shared_data_dir() / "glas" / "images" / "testA_1.png")  # 775 x 522 H&E
    corners = [(y, x) for y in range(0, image.shape[0] - TILE + 1, 100) for x in range(0, image.shape[1] - TILE + 1, 100)]
    tiles = np.stack([image[y : y + TILE, x : x + TILE] for y, x in corners[:batch]] * (batch // len(corners) + 1))[:batch]
    reps = (region // image.shape[0] + 1, region // image.shape[1] + 1, 1)
    square = np.ascontiguousarray(np.tile(image, reps)[:region, :region][None])
    return np.ascontiguousarray(tiles), square


def _rate(fn, units: float, repeats: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return units * repeats / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--region", type=int, default=1984, help="square region side, a multiple of 8")
    args = ap.parse_args(argv)
    tiles, square = _inputs(args.batch, args.region)
    k = args.region // 8
    shapes = [(8 * k, 8 * k), (8 * k, 6 * k), (5 * k, 8 * k), (7 * k, 4 * k), (3 * k, 8 * k)]
    predictors = {m.name: Predictor(m, threads=args.threads) for m in args.models}
    for p in predictors.values():  # warm-up
        p.predict(tiles)
        p.predict_dense(square)
    rows: dict[str, dict[str, list[float]]] = {n: {"tiles": [], "dense": [], "dense_shapes": []} for n in predictors}
    for _ in range(args.rounds):
        for name, p in predictors.items():
            rows[name]["tiles"].append(_rate(lambda p=p: p.predict(tiles), len(tiles), 5))
            rows[name]["dense"].append(_rate(lambda p=p: p.predict_dense(square), args.region**2 / TILE**2, 2))
            t0, px = time.perf_counter(), 0
            for h, w in shapes:
                p.predict_dense(np.ascontiguousarray(square[:, :h, :w]))
                px += h * w
            rows[name]["dense_shapes"].append(px / TILE**2 / (time.perf_counter() - t0))
    for name, r in rows.items():
        print(f"{name}: tiles/s (batches of {args.batch}) {[round(v, 1) for v in r['tiles']]}; "  # noqa: T201
              f"dense {args.region} px, tile-equivalents/s {[round(v, 1) for v in r['dense']]}; "
              f"five shapes in turn {[round(v, 1) for v in r['dense_shapes']]}")
    print(json.dumps({"machine": machine_info(), "threads": args.threads, "results": rows}))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
