"""`training/run.py --dataset slides`: a quick real run on GlaS mosaics, its model analysed by `pixelcam analyze`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.runtime import read_model_metadata
from tests.conftest import REPO_ROOT
from training.config import ConfigError
from training.mosaics import write_mosaics
from training.progress import read_progress
from training.run import main
from training.stages import StageError, resolve_init_from


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, glas_dir: Path) -> Path:
    """Two mosaics per grade of train images and one per grade of test images (split test)."""
    out = tmp_path_factory.mktemp("mosaics")
    train = write_mosaics(glas_dir, out / "train", subset="train", images_per_slide=2, max_slides=2)
    test = write_mosaics(glas_dir, out / "test", subset="test", images_per_slide=2, max_slides=1)
    rows = train.read_text().splitlines()
    rows += [",".join(["../test/" + c if c.endswith((".tif", ".geojson")) else c for c in line.split(",")])
             for line in test.read_text().splitlines()[1:]]
    path = train.parent / "all.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, manifest: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["--dataset", "slides", "--manifest", str(manifest), "--quick", "--run-dir", str(out)]) == 0
    return out


def test_the_recipe_runs_on_slides_split_by_slide(run_dir: Path) -> None:
    splits = json.loads((run_dir / "splits.json").read_text())
    by_slide = splits["slides"]
    assert sorted(by_slide["test"]) == ["glas-test-benign-01", "glas-test-malignant-01"]
    assert len(by_slide["train"]) == len(by_slide["valcl"]) == 2 and by_slide["valpx"] == by_slide["valcl"]
    for split in ("train", "valcl", "test"):  # every tile belongs to a slide of its split
        assert splits[split] and {n.rsplit("/", 1)[0] for n in splits[split]} == set(by_slide[split])
    progress = read_progress(run_dir)
    assert progress is not None and progress["state"] == "done" and progress["progress"] == 1.0
    assert progress["stages"][0] == "extract" and progress["metrics"]["valcl_acc"] is not None


def test_evaluate_reports_the_slide_path_of_the_test_slides(run_dir: Path) -> None:
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["eval_split"] == "test" and report["n_test"] > 4
    path = report["slide_path"]
    assert path["n"] == 2 and path["split"] == "test" and 0 <= path["accuracy"] <= 100 and 0 < path["pxap"] <= 100
    assert "rasterised annotations" in path["protocol"]
    assert 0 <= report["results"]["pixelcam"]["test"]["pxap"] <= 100


def test_the_exported_model_is_accepted_by_pixelcam_analyze(run_dir: Path, manifest: Path, tmp_path: Path) -> None:
    (onnx,) = (run_dir / "export").glob("*.onnx")
    assert onnx.name == "pixelcam-slides-resnet18.onnx"
    meta = read_model_metadata(onnx)
    assert meta.input_mpp == 2.5 and "slides: 2 training slides" in json.dumps(meta.to_dict())
    slide = manifest.parent.parent / "test" / "glas-test-malignant-01.tif"
    proc = subprocess.run([sys.executable, "-m", "service.cli.main", "analyze", str(slide), "--model", str(onnx),
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["classification"]["label"] in ("benign", "malignant")


def test_fine_tuning_starts_from_a_checkpoint(run_dir: Path, manifest: Path, tmp_path: Path) -> None:
    ckpt = run_dir / "pixelcam" / "best_localization.pt"
    out = tmp_path / "tuned"
    assert main(["--dataset", "slides", "--manifest", str(manifest), "--quick", "--run-dir", str(out),
                 "--init-from", str(ckpt), "--stage", "baseline"]) == 0
    log = (out / "train.log").read_text()
    assert "fine-tuning from best_localization.pt" in log and "left at their initialisation: none" in log
    assert json.loads((out / "baseline" / "report.json").read_text())["epochs"] == 1
    with pytest.raises(StageError, match="fused weights"):
        resolve_init_from(str(run_dir / "export" / "pixelcam-slides-resnet18.onnx"))
    with pytest.raises(StageError, match="neither a checkpoint"):
        resolve_init_from("no-such-model")


def test_slides_need_a_manifest() -> None:
    with pytest.raises(ConfigError, match="needs --manifest"):
        main(["--dataset", "slides", "--run-dir", "/nonexistent"])


def test_the_shipped_checkpoint_is_the_shipped_default_model(glas_dir: Path) -> None:
    """init_from "default" fine-tunes the very network the service ships: same outputs on real tiles."""
    import cv2
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.runtime import Predictor
    from training.data import read_rgb
    from training.evaluate import to_input

    ckpt = resolve_init_from("default")
    onnx = ckpt.with_suffix(".onnx")
    assert ckpt.parent == REPO_ROOT / "model" / "weights" and onnx.is_file()
    model, cfg, _ = load_checkpoint(ckpt)
    image = read_rgb(glas_dir / "images" / "testA_1.png")
    image = cv2.resize(image, (round(image.shape[1] * 0.62005), round(image.shape[0] * 0.62005)),
                       interpolation=cv2.INTER_AREA)
    tiles = np.stack([image[:224, :224], image[60:284, 120:344]])
    with torch.no_grad():
        out = model.eval()(to_input(tiles, cfg.mean, cfg.std))
    pred = Predictor(onnx, providers=["CPUExecutionProvider"]).predict(tiles)
    np.testing.assert_allclose(pred.fg_prob, torch.softmax(out.fg_logits, 1)[:, 1].numpy(), atol=1e-4)
    np.testing.assert_allclose(pred.class_probs, torch.softmax(out.class_logits, 1).numpy(), atol=1e-4)


def test_balanced_selection_exports_an_accurate_epoch(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "balanced"
    assert main(["--dataset", "slides", "--manifest", str(manifest), "--quick", "--run-dir", str(out),
                 "--pixelcam-epochs", "3", "--export-select", "balanced", "--balanced-margin", "0"]) == 0
    report = json.loads((out / "pixelcam" / "report.json").read_text())
    rows = [r for r in report["history"] if "valcl_acc" in r]
    best = max(r["valcl_acc"] for r in rows)
    chosen = next(r for r in rows if r["epoch"] == report["best_balanced_epoch"])
    assert chosen["valcl_acc"] == best  # margin 0: only the most accurate epochs qualify
    assert (out / "pixelcam" / "best_balanced.pt").is_file() and not (out / "pixelcam" / "epochs").exists()
    meta = read_model_metadata(next((out / "export").glob("*.onnx")))
    assert "best_balanced" in json.dumps(meta.to_dict())
    evaluate = json.loads((out / "evaluate" / "report.json").read_text())
    assert evaluate["results"]["pixelcam"]["checkpoint"].endswith("best_balanced.pt")
