"""The two training stages: the WSOL baseline (stage 1) and PixelCAM joint training (stage 3).

Both share one loop: random 224 crops of the resampled images, image CE, and in stage 3 the partial CE on
seeds drawn afresh every iteration from the stored stage-1 CAMs (same geometric augmentation as the image).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.network import PixelCAM, param_groups
from training.config import TrainConfig
from training.data import Sample, make_train_batch
from training.evaluate import evaluate_split, to_input
from training.losses import partial_ce
from training.pseudo_labels import IGNORE_INDEX, sample_seeds

logger = logging.getLogger(__name__)

STAGE_IDS = {"baseline": 1, "pixelcam": 3}


@dataclass
class StageState:
    """What a stage carries across epochs (and across a resume)."""

    epoch: int = 0
    best_acc: float = -1.0
    best_pxap: float = -1.0
    best_acc_epoch: int = -1
    best_pxap_epoch: int = -1
    best_balanced_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images: int = 0
    train_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view for checkpoints and reports."""
        return dict(self.__dict__)


def map_mode(stage: str, cfg: TrainConfig) -> str:
    """Which localisation map a stage is judged by: the baseline's CAM or PixelCAM's pixel head (a baseline
    never has a trained pixel head: with cam_method "pixel" it is judged by its CAM)."""
    if stage == "baseline":
        return "cam" if cfg.cam_method == "pixel" else cfg.cam_method
    return "pixel"


def make_optimizer(model: PixelCAM, stage: str, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; stage 3 keeps the paper's x`head_lr_ratio` group for layer4 + both heads."""
    if stage == "baseline":
        groups = param_groups(model, cfg.lr, head_lr_ratio=1.0)
    else:
        groups = param_groups(model, cfg.pixelcam_lr, head_lr_ratio=cfg.head_lr_ratio)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: int) -> Any:
    """Linear warm-up then cosine decay to 1 % of each group's lr, stepped every iteration."""
    total = max(1, steps_per_epoch * epochs)
    warm = min(total - 1, steps_per_epoch * warmup_epochs)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def pixel_loss(
    out_fg: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Partial CE on fresh seeds: at input resolution (default) or at feature resolution (`low_res`).

    Images whose class is not in `seed_classes` (when that is set) contribute no seeds.
    """
    if cfg.low_res:
        cams = F.interpolate(cams[:, None], size=out_fg.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    seeds = sample_seeds(cams, n_fg=cfg.n_fg, n_bg=cfg.n_bg, bg_area_frac=cfg.bg_area_frac,
                         fg_power=cfg.fg_power, generator=gen)
    if cfg.seed_classes:
        keep = torch.tensor([cfg.class_names[int(y)] in cfg.seed_classes for y in labels])
        seeds[~keep] = IGNORE_INDEX
    return partial_ce(out_fg, seeds)


def run_epoch(
    model: PixelCAM,
    opt: torch.optim.Optimizer,
    sched: Any,
    samples: list[Sample],
    cfg: TrainConfig,
    mcfg: ModelConfig,
    *,
    stage: str,
    epoch: int,
    cams: dict[str, np.ndarray] | None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """One pass over the training images (the last batch is filled by repeating images)."""
    rng = np.random.default_rng([cfg.seed, STAGE_IDS[stage], epoch])
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    n = len(samples)
    steps = math.ceil(n / cfg.batch_size)
    order = np.concatenate([rng.permutation(n), rng.permutation(n)])[: steps * cfg.batch_size]
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "pce": 0.0}
    bar = tqdm(range(steps), desc=f"{stage} epoch {epoch + 1}/{_epochs(stage, cfg)}", leave=False)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        images, labels, cam_np = make_train_batch(
            samples, idx, rng, size=cfg.input_size, cams=cams, stride=mcfg.output_stride, jitter=cfg.jitter
        )
        out = model(to_input(images, mcfg.mean, mcfg.std))
        ce = F.cross_entropy(out.class_logits, torch.from_numpy(labels))
        loss = ce
        if cam_np is not None:
            pce = pixel_loss(out.fg_logits, torch.from_numpy(cam_np), torch.from_numpy(labels), cfg, gen)
            loss = ce + cfg.pixel_lambda * pce
            sums["pce"] += pce.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums["loss"] += loss.item()
        sums["ce"] += ce.item()
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")
        if on_step is not None:
            on_step(step + 1, steps)
    return {k: v / steps for k, v in sums.items()}


def _epochs(stage: str, cfg: TrainConfig) -> int:
    return cfg.epochs if stage == "baseline" else cfg.pixelcam_epochs


def train_stage(
    model: PixelCAM,
    cfg: TrainConfig,
    *,
    stage: str,
    train: list[Sample],
    valcl: list[Sample],
    valpx_names: set[str],
    out_dir: Path,
    cams: dict[str, np.ndarray] | None = None,
    resume: dict[str, Any] | None = None,
    progress: Callable[..., None] | None = None,
) -> StageState:
    """Train one stage, validating every `eval_every` epochs; writes last / best_* checkpoints to out_dir.

    `progress(fraction, epoch=, epochs=, metrics=, force=)` is told how far the stage is (after every step).
    """
    mcfg = model.config
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = _epochs(stage, cfg)
    opt = make_optimizer(model, stage, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = make_scheduler(opt, steps_per_epoch, epochs, cfg.warmup_epochs)
    state = StageState()
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        state = StageState(**resume["state"])
        logger.info("%s: resumed after epoch %d", stage, state.epoch)
    mode = map_mode(stage, cfg)
    for epoch in range(state.epoch, epochs):
        t0 = time.perf_counter()
        def on_step(step: int, steps: int, epoch: int = epoch) -> None:
            if progress is not None:
                progress((epoch + step / steps) / epochs, epoch=epoch + 1, epochs=epochs)

        losses = run_epoch(model, opt, sched, train, cfg, mcfg, stage=stage, epoch=epoch, cams=cams,
                           on_step=on_step)
        state.train_time_s += time.perf_counter() - t0
        state.train_images += steps_per_epoch * cfg.batch_size
        state.epoch = epoch + 1
        row: dict[str, Any] = {"epoch": epoch + 1, **losses}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
            row.update(_validate(model, valcl, valpx_names, mode))
            _keep_best(model, mcfg, cfg, state, row, out_dir)
            if balanced(stage, cfg):
                save_checkpoint(out_dir / "epochs" / f"epoch{epoch + 1:03d}.pt", model, mcfg, train_config=cfg,
                                extra={"row": row})
        state.history.append(row)
        logger.info("%s epoch %d/%d %s", stage, epoch + 1, epochs, _fmt(row))
        if progress is not None:
            progress((epoch + 1) / epochs, epoch=epoch + 1, epochs=epochs, force=True,
                     metrics={k: row[k] for k in ("loss", "valcl_acc", "valpx_pxap") if k in row})
        extra = {
            "stage": stage,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "state": state.to_dict(),
        }
        save_checkpoint(out_dir / "last.pt", model, mcfg, train_config=cfg, extra=extra)
    if balanced(stage, cfg):
        _keep_balanced(cfg, state, out_dir)
    return state


def balanced(stage: str, cfg: TrainConfig) -> bool:
    """Whether this stage keeps a best_balanced checkpoint (stage 3 with export_select "balanced")."""
    return stage == "pixelcam" and cfg.export_select == "balanced"


def _keep_balanced(cfg: TrainConfig, state: StageState, out_dir: Path) -> None:
    """best_balanced.pt: the best valpx PxAP among the validated epochs within `balanced_margin` points of the
    best valcl accuracy (the most accurate of them when no PxAP was measured); the per-epoch files go."""
    rows = [r for r in state.history if "valcl_acc" in r and (out_dir / "epochs" / f"epoch{r['epoch']:03d}.pt").is_file()]
    if rows:
        best_acc = max(r["valcl_acc"] for r in rows)
        near = [r for r in rows if r["valcl_acc"] >= best_acc - cfg.balanced_margin]
        pick = max(near, key=lambda r: (-1.0 if math.isnan(r["valpx_pxap"]) else r["valpx_pxap"], r["valcl_acc"]))
        shutil.copyfile(out_dir / "epochs" / f"epoch{pick['epoch']:03d}.pt", out_dir / "best_balanced.pt")
        state.best_balanced_epoch = int(pick["epoch"])
        logger.info("best_balanced: epoch %d (valcl acc %.2f within %.1f of %.2f, valpx PxAP %.2f)", pick["epoch"],
                    pick["valcl_acc"], cfg.balanced_margin, best_acc, pick["valpx_pxap"])
    shutil.rmtree(out_dir / "epochs", ignore_errors=True)


def _validate(model: PixelCAM, valcl: list[Sample], valpx_names: set[str], mode: str) -> dict[str, float]:
    """valcl accuracy and valpx PxAP (valpx ⊂ valcl, so one pass serves both)."""
    res = evaluate_split(model, valcl, mode=mode, pixel_names=valpx_names)
    return {"valcl_acc": res.accuracy, "valpx_pxap": res.counts.pxap() if res.n_masked else float("nan")}


def _keep_best(
    model: PixelCAM, mcfg: ModelConfig, cfg: TrainConfig, state: StageState, row: dict[str, Any], out_dir: Path
) -> None:
    """best_classification on valcl accuracy (later epoch wins ties), best_localization on valpx PxAP."""
    if row["valcl_acc"] >= state.best_acc:
        state.best_acc, state.best_acc_epoch = row["valcl_acc"], row["epoch"]
        save_checkpoint(out_dir / "best_classification.pt", model, mcfg, train_config=cfg, extra={"row": row})
    pxap = row["valpx_pxap"]
    if math.isnan(pxap) and state.best_acc_epoch == row["epoch"]:
        # no annotated validation image: the localisation checkpoint is the classification one
        save_checkpoint(out_dir / "best_localization.pt", model, mcfg, train_config=cfg, extra={"row": row})
        state.best_pxap_epoch = row["epoch"]
    elif not math.isnan(pxap) and pxap > state.best_pxap:
        state.best_pxap, state.best_pxap_epoch = pxap, row["epoch"]
        save_checkpoint(out_dir / "best_localization.pt", model, mcfg, train_config=cfg, extra={"row": row})


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch")
