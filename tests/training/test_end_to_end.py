"""A short real run on a handful of GlaS images: every stage, through ONNX export and parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from model.errors import InvalidModelError
from model.runtime import Predictor, read_model_metadata
from training.config import ConfigError
from training.run import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, glas_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["--quick", "--data-dir", str(glas_dir), "--run-dir", str(out), "--copy-to", str(out / "models")]) == 0
    return out


def _report(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "report.json").read_text())


def test_all_stages_write_reports(run_dir: Path) -> None:
    for stage in ("baseline", "cams", "pixelcam", "evaluate", "export"):
        assert (run_dir / stage / "summary.md").read_text().startswith(f"# Stage {stage}")
        assert _report(run_dir, stage)["stage"] == stage
    splits = json.loads((run_dir / "splits.json").read_text())
    assert set(splits) == {"train", "valcl", "valpx", "test"} and splits["valpx"]
    assert (run_dir / "config.yaml").is_file()
    for stage in ("baseline", "pixelcam"):
        rep = _report(run_dir, stage)
        assert rep["train_images_per_s"] > 0 and rep["best_localization_epoch"] == 1
        assert (run_dir / stage / "best_localization.pt").is_file()


def test_cams_are_stored_per_training_image(run_dir: Path) -> None:
    splits = json.loads((run_dir / "splits.json").read_text())
    with np.load(run_dir / "cams" / "cams.npz") as cams:
        assert sorted(cams.files) == sorted(splits["train"])
        for name in cams.files:
            cam = cams[name]
            assert cam.dtype == np.float16 and cam.ndim == 2
            assert float(cam.min()) == 0.0 and float(cam.max()) == pytest.approx(1.0, abs=1e-3)


def test_evaluation_uses_the_valpx_threshold(run_dir: Path) -> None:
    rep = _report(run_dir, "evaluate")
    for name in ("baseline", "pixelcam"):
        r = rep["results"][name]
        assert r["test"]["n_images"] == rep["n_test"] > 0
        assert 0 <= r["test"]["pxap"] <= 100 and r["tau"] == r["valpx"]["tau"] == r["test"]["tau"]
    assert rep["results"]["pixelcam"]["map_mode"] == "pixel"


def test_export_is_valid_and_matches_torch(run_dir: Path) -> None:
    rep = _report(run_dir, "export")
    path = Path(rep["copied_to"])
    meta = read_model_metadata(path)
    assert meta.input_mpp == 2.5 and meta.input_size == 64 and meta.output_stride == 8
    assert meta.positive_class == "malignant" and meta.class_names == ("benign", "malignant")
    assert meta.fg_threshold == pytest.approx(_report(run_dir, "evaluate")["results"]["pixelcam"]["tau"], abs=1e-3)
    assert max(rep["parity_max_abs_diff"].values()) < 1e-4 and rep["parity_tiles"] == 8
    pred = Predictor(path).predict(np.full((2, 64, 64, 3), 255, np.uint8))
    assert pred.fg_prob.shape == (2, 8, 8)
    np.testing.assert_allclose(pred.class_probs.sum(axis=1), 1.0, rtol=1e-5)
    assert meta.dense  # a ResNet exports as format_version 2


def test_the_exported_model_is_scored_through_the_slide_path(run_dir: Path) -> None:
    evaluate = _report(run_dir, "evaluate")
    slide_path = _report(run_dir, "export")["slide_path"]
    assert slide_path["n"] == evaluate["n_test"] == len(slide_path["images"])
    assert 0 <= slide_path["accuracy"] <= 100 and 0 <= slide_path["pxap"] <= 100
    assert slide_path["options"]["inference"] == "auto"
    assert evaluate["slide_path"]["pxap"] == slide_path["pxap"]  # beside the whole-image numbers
    assert "Slide path" in (run_dir / "evaluate" / "summary.md").read_text()


def test_broken_metadata_is_refused(run_dir: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(Path(_report(run_dir, "export")["onnx"])))
    doc = json.loads(proto.metadata_props[0].value)
    doc["positive_class"] = "tumour"
    proto.metadata_props[0].value = json.dumps(doc)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(InvalidModelError, match="positive"):
        read_model_metadata(bad)


def test_resume_continues_a_stage(run_dir: Path, glas_dir: Path) -> None:
    last = run_dir / "baseline" / "last.pt"
    args = ["--quick", "--data-dir", str(glas_dir), "--run-dir", str(run_dir), "--stage", "baseline"]
    assert main([*args, "--epochs", "2", "--resume", str(last)]) == 0
    history = _report(run_dir, "baseline")["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_second_round_seeds_from_a_pixelcam_map(run_dir: Path, glas_dir: Path, tmp_path: Path) -> None:
    round2 = tmp_path / "round2"
    round2.mkdir()
    shutil.copy(run_dir / "splits.json", round2 / "splits.json")
    first = run_dir / "pixelcam" / "best_localization.pt"
    args = ["--quick", "--data-dir", str(glas_dir), "--run-dir", str(round2), "--stage", "cams"]
    with pytest.raises(ConfigError, match="set cams_from"):  # "pixel" needs the checkpoint whose map it is
        main([*args, "--cam-method", "pixel"])
    assert main([*args, "--cam-method", "pixel", "--cams-from", str(first)]) == 0
    assert _report(round2, "cams")["checkpoint"] == str(first)
    with np.load(round2 / "cams" / "cams.npz") as cams, np.load(run_dir / "cams" / "cams.npz") as baseline:
        assert set(cams.files) == set(baseline.files)
        for name in cams.files:  # stretched to [0, 1] per image, and not the baseline's CAMs
            a = cams[name].astype(np.float32)
            assert a.min() == 0.0 and a.max() == pytest.approx(1.0, abs=1e-3) or a.max() == 0.0
        assert any(not np.allclose(cams[n], baseline[n], atol=1e-2) for n in cams.files)


def test_seed_rounds_reseed_stage3_from_the_previous_rounds_pixel_map(run_dir: Path, glas_dir: Path,
                                                                      tmp_path: Path) -> None:
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    for item in ("splits.json", "baseline", "cams"):
        (shutil.copytree if (run_dir / item).is_dir() else shutil.copy)(run_dir / item, rounds / item)
    assert main(["--quick", "--data-dir", str(glas_dir), "--run-dir", str(rounds), "--stage", "pixelcam",
                 "--seed-rounds", "2"]) == 0
    assert (rounds / "pixelcam_round1" / "best_localization.pt").is_file()
    assert _report(rounds, "cams_round2")["checkpoint"] == str(rounds / "pixelcam_round1" / "best_localization.pt")
    assert _report(rounds, "cams_round2")["cam_method"] == "pixel"
    assert _report(rounds, "pixelcam")["init"].endswith("best_classification.pt")  # the last round, from stage 1
    with np.load(rounds / "cams_round2" / "cams.npz") as seeds, np.load(rounds / "cams" / "cams.npz") as cams:
        assert set(seeds.files) == set(cams.files)
