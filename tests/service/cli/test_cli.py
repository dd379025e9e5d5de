"""`pixelcam analyze`: outputs on the real CMU slide, and one distinct exit code per kind of failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.cli import analyze
from service.cli.main import main


def test_analyze_writes_all_four_files(
    cmu_small_path: Path, random_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["analyze", str(cmu_small_path), "--model", str(random_model_path), "--out", str(out)]
    code = main([*argv, "--threads", "2", "--batch-size", "8", "--blend", "cosine", "--quiet", "--gzip"])
    assert code == analyze.EXIT_OK
    assert {p.name for p in out.iterdir()} == {
        "result.json",
        "heatmap.tif",
        "overlay.png",
        "result.geojson.gz",
    }
    result = json.loads((out / "result.json").read_text())
    assert result["provenance"]["parameters"]["batch_size"] == 8
    assert result["provenance"]["parameters"]["blend"] == "cosine"
    assert result["outputs"]["geojson"] == "result.geojson.gz"
    printed = capsys.readouterr().out
    assert cmu_small_path.name in printed and result["classification"]["label"] in printed


def test_the_heatmap_is_zero_off_the_tissue_unless_raw_is_asked(
    cmu_small_path: Path, random_model_path: Path, tmp_path: Path
) -> None:
    import tifffile

    from service.outputs.stitching import decode_heatmap

    maps = {}
    for name, extra in (("gated", []), ("raw", ["--raw-heatmap"])):
        out = tmp_path / name
        argv = ["analyze", str(cmu_small_path), "--model", str(random_model_path), "--out", str(out), "--quiet"]
        assert main([*argv, "--threads", "2", *extra]) == analyze.EXIT_OK
        result = json.loads((out / "result.json").read_text())
        assert result["provenance"]["parameters"]["tissue_only"] is (name == "gated")
        maps[name] = decode_heatmap(tifffile.imread(out / "heatmap.tif", key=0))
    (gated, covered), (raw, raw_covered) = maps["gated"], maps["raw"]
    np.testing.assert_array_equal(covered, raw_covered)  # the same cells analysed
    zeroed = covered & (gated == 0) & (raw > 0.05)
    assert zeroed.sum() > 100  # CMU-1-Small-Region's kept tiles hold glass: those cells are 0 only when gated
    kept = covered & (gated > 0)
    np.testing.assert_allclose(gated[kept], raw[kept], atol=1 / 254)  # on tissue the map is untouched


def test_missing_mpp_exits_4_and_names_the_override(
    missing_mpp_slide_path: Path, random_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["analyze", str(missing_mpp_slide_path), "--model", str(random_model_path), "--out", str(out)]
    assert main([*argv, "--quiet"]) == analyze.EXIT_MPP
    assert "--mpp" in caplog.text
    assert not out.exists()  # a refused slide leaves nothing behind


def test_refused_slide_exits_3_with_the_reason(
    refused_slide_path: Path, random_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["analyze", str(refused_slide_path), "--model", str(random_model_path), "--out", str(tmp_path)]
    assert main(argv) == analyze.EXIT_SLIDE
    assert "fluorescence" in caplog.text
    assert list(tmp_path.iterdir()) == []  # an existing output folder is kept, without work files


def test_refused_model_exits_5(
    cmu_small_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not a model")
    assert main(["analyze", str(cmu_small_path), "--model", str(bogus), "--out", str(tmp_path)]) == 5
    assert "model refused" in caplog.text


@pytest.mark.parametrize(
    "extra",
    [["--overlap", "1.5"], ["--min-tissue", "-1"], ["--batch-size", "0"], ["--threads", "0"],
     ["--inference", "dense", "--overlap", "0.5"], ["--halo", "60"], ["--region-tiles", "0"]],
)
def test_bad_flags_exit_2(cmu_small_path: Path, random_model_path: Path, extra: list[str]) -> None:
    assert (
        main(["analyze", str(cmu_small_path), "--model", str(random_model_path), *extra])
        == analyze.EXIT_USAGE
    )


def test_usage_errors_exit_2(
    cmu_small_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert main([]) == analyze.EXIT_USAGE
    assert main(["analyze"]) == analyze.EXIT_USAGE
    assert main(["analyze", str(tmp_path / "absent.svs"), "--model", "m.onnx"]) == analyze.EXIT_USAGE
    monkeypatch.setattr(analyze, "default_model_path", lambda: tmp_path / "missing.onnx")
    assert main(["analyze", str(cmu_small_path), "--out", str(tmp_path)]) == analyze.EXIT_USAGE
    assert "--model" in caplog.text


def test_out_pointing_at_a_file_exits_2_and_leaves_the_file(cmu_small_path: Path, random_model_path: Path,
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code = main(["analyze", str(cmu_small_path), "--model", str(random_model_path), "--out", str(existing)])
    assert code == analyze.EXIT_USAGE
    assert "is a file" in caplog.text and existing.read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_installed_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    assert main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"pixelcam {importlib.metadata.version('pixelcam')}"


def test_default_model_lives_in_the_model_package() -> None:
    path = analyze.default_model_path()
    assert path.name == analyze.DEFAULT_MODEL_NAME and path.parent.name == "weights"
    assert (path.parent.parent / "runtime.py").is_file()


def test_module_entry_point_lists_every_subcommand() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0
    for command in ("analyze", "serve", "worker"):
        assert command in done.stdout


def test_inference_mode_reaches_the_plan(cmu_small_path: Path, random_model_path: Path, tmp_path: Path) -> None:
    for mode, dense in (("tiles", False), ("dense", True)):
        out = tmp_path / mode
        argv = ["analyze", str(cmu_small_path), "--model", str(random_model_path), "--out", str(out), "--quiet",
                "--inference", mode, "--region-tiles", "2", "--halo", "32"]
        assert main(argv) == analyze.EXIT_OK
        params = json.loads((out / "result.json").read_text())["provenance"]["parameters"]
        assert params["inference"] == mode and params["region_tiles"] == 2 and params["halo_px"] == 32
        assert ("regions" in params) == dense
