"""docs/analysis.md's example run is the shipped default model's real output, checked against a fresh run.

Regenerate the block after changing the default model or the analysis:
    .venv/bin/python -m tests.service.test_docs_examples
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from model.runtime import Predictor
from service.analysis.pipeline import analyze_slide
from service.analysis.plan import AnalysisOptions
from service.cli.analyze import default_model_path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "analysis.md"
BEGIN, END = "<!-- example-run:begin -->", "<!-- example-run:end -->"


def example_table(slide: Path, work: Path) -> str:
    """The Markdown table docs/analysis.md shows: `pixelcam analyze` of `slide` with every default."""
    model = default_model_path()
    result = analyze_slide(slide, Predictor(model, threads=2), work, AnalysisOptions())
    doc: dict[str, Any] = result.result
    cls, ev = doc["classification"], doc["evidence"]
    top = ev["top_regions"][0] if ev["top_regions"] else None
    rows = [
        ("model", f"`{model.name}`"),
        ("tissue tiles analysed", str(ev["tiles_analysed"])),
        ("slide call", f"{cls['label']}, positive probability {cls['positive_probability']:.2f} "
                       f"(top-{cls['aggregation']['k']} mean)"),
        ("tissue-weighted mean probability", ", ".join(f"{k} {v:.2f}" for k, v in cls["class_means"].items())),
        ("tissue area", f"{ev['tissue_area_mm2']:.2f} mm²"),
        ("positive area", f"{ev['positive_area_mm2']:.2f} mm², {100 * ev['positive_fraction_of_tissue']:.0f} % "
                          "of the tissue"),
        ("regions", str(ev["regions"])),
        ("largest region", f"{top['area_um2'] / 1e6:.2f} mm², mean probability {top['mean_probability']:.2f}"
         if top else "none"),
    ]
    return "\n".join(["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def documented_table() -> str:
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), DOC.read_text(), re.S)
    assert match, f"{DOC.name} lost its {BEGIN} ... {END} block"
    return match.group(1).strip()


@pytest.mark.skipif(not default_model_path().is_file(), reason="the default model is not in this checkout")
def test_the_documented_example_is_what_the_default_model_gives(cmu_small_path: Path, tmp_path: Path) -> None:
    fresh = example_table(cmu_small_path, tmp_path / "run")
    assert documented_table() == fresh, (
        "docs/analysis.md's example no longer matches a fresh run; regenerate it with "
        f"`python -m tests.service.test_docs_examples`. A fresh run gives:\n{fresh}")


if __name__ == "__main__":
    from tests.conftest import shared_data_dir  # noqa: PLC0415

    table = example_table(shared_data_dir() / "slides" / "CMU-1-Small-Region.svs", Path(tempfile.mkdtemp()))
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    sys.stdout.write(table + "\n")
