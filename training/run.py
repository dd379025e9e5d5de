"""Train, evaluate and export PixelCAM: `python training/run.py [--config FILE.yaml] [--stage STAGE] [flags]`.

Stages (all by default): baseline -> cams -> pixelcam -> evaluate -> export, everything inside --run-dir.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable when it is not installed
    try:
        import training  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from training.config import TrainConfig, resolve_config, save_config
from training.export_stage import run_export  # at start: a run never mixes code versions (edited mid-run)
from training.progress import RunProgress
from training.stages import (
    apply_init_from,
    prepare_run,
    run_baseline,
    run_cams,
    run_evaluate,
    run_pixelcam,
    stage_wall_times,
)

logger = logging.getLogger("training.run")

ORDER = ("baseline", "cams", "pixelcam", "evaluate", "export")


def setup(cfg: TrainConfig) -> None:
    """Logging to the console and the run dir, torch threads and fixed seeds."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)


def main(argv: list[str] | None = None) -> int:
    """Run the requested stage(s); returns the process exit code."""
    cfg = resolve_config(argv)
    setup(cfg)
    run_dir = Path(cfg.run_dir)
    stages: tuple[str, ...] = ORDER if cfg.stage == "all" else (cfg.stage,)
    if cfg.stage == "all" and cfg.resume:
        # resuming a whole recipe: skip the stages that already finished before the resumed one
        done = [s for s in ORDER if (run_dir / s / "report.json").is_file()]
        stages = tuple(s for s in ORDER if s not in done)
        logger.info("resume: skipping finished stages %s", done)
    progress = RunProgress(run_dir, (("extract",) if cfg.dataset == "slides" else ()) + stages)
    try:
        run_stages(cfg, stages, progress)
    except BaseException as err:
        progress.finish("failed", f"{type(err).__name__}: {err}")
        raise
    progress.finish("done")
    return 0


def run_stages(cfg: TrainConfig, stages: tuple[str, ...], progress: RunProgress) -> None:
    """Prepare the run (dataset, splits; tiles with dataset slides), then run `stages` in order."""
    cfg = apply_init_from(cfg)
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    logger.info("config sha256 %s; run dir %s", cfg.sha256(), cfg.run_dir)
    ctx = prepare_run(cfg, progress)
    t0 = time.perf_counter()
    for stage in stages:
        logger.info("=== stage %s ===", stage)
        progress.start(stage)
        if stage == "baseline":
            run_baseline(ctx)
        elif stage == "cams":
            run_cams(ctx)
        elif stage == "pixelcam":
            run_pixelcam(ctx)
        elif stage == "evaluate":
            run_evaluate(ctx)
        elif stage == "export":
            run_export(ctx)
    logger.info("done in %.1f s; stage wall times %s", time.perf_counter() - t0, stage_wall_times(ctx.run_dir))


if __name__ == "__main__":
    sys.exit(main())
