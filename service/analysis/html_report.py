"""A slide report a pathologist can read without tools: one self-contained HTML file (no external URL).

From a finished analysis (its result.json and overlay.png) and the slide itself: the thumbnail and the heatmap
overlay side by side (the overlay carries its colour bar, scale bar and call), the call with its probability and
the reason (how the slide call is made), the evidence (tissue, analysed and positive area in mm², the largest
positive regions with crops of the slide), the model with the numbers its card states, the provenance, and the
caveats: research use only, where the µm/px came from, what the analysis left out. Images are inline data URIs,
styles inline; nothing is fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.slide.wsi import open_slide

__all__ = ["REPORT_FILE", "render_report", "write_html_report"]

REPORT_FILE = "report.html"
THUMB_SIDE = 720
CROP_SIDE = 200
TOP_REGIONS = 5

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1e1e1e;max-width:1500px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd}
.call{font-size:20px;font-weight:600;padding:10px 14px;border-radius:6px;display:inline-block;margin:8px 0}
.pos{background:#fde2e2;color:#8b0000} .neg{background:#e3f4e6;color:#12501f} .none{background:#eee}
.pair{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start} figure{margin:0} figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:14px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.regions{display:flex;gap:12px;flex-wrap:wrap} .regions figure{width:200px}
.caveat{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;font-size:14px}
.small{font-size:12px;color:#555} code{font-size:12px}
"""


def _png_uri(rgb: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _region_crops(slide: Any, regions: list[dict[str, Any]], offset: tuple[int, int]) -> list[np.ndarray]:
    """A crop of the slide around each region's box (GeoJSON frame: add the bounds offset back)."""
    crops = []
    w, h = slide.info.l0_size_wh
    for region in regions:
        x, y, bw, bh = region["l0_box_xywh"]
        side = max(bw, bh) * 1.2 + 32
        cx, cy = x + offset[0] + bw / 2, y + offset[1] + bh / 2
        x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        rw, rh = int(min(side, w - x0)), int(min(side, h - y0))
        ds = max(1.0, max(rw, rh) / CROP_SIDE)
        level = slide.best_level_for_downsample(ds)
        lds = slide.info.level_downsamples[level]
        pixels = np.asarray(slide.read_region((x0, y0), level, (max(1, int(rw / lds)), max(1, int(rh / lds)))))
        scale = CROP_SIDE / max(pixels.shape[:2])
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        crops.append(cv2.resize(pixels[..., :3], size, interpolation=cv2.INTER_AREA))
    return crops


def _metrics_rows(metadata: dict[str, Any]) -> str:
    """The model card's numbers carried in the model's own metadata (test split of its training run)."""
    prov = metadata.get("provenance", {})
    rows = [("encoder", metadata.get("encoder")), ("input", f"{metadata.get('input_size')} px at "
                                                          f"{metadata.get('input_mpp')} µm/px"),
            ("classes", ", ".join(c["name"] for c in metadata.get("classes", []))),
            ("trained on", prov.get("dataset")), ("trained from", prov.get("trained_from"))]
    pixelcam = prov.get("metrics", {}).get("pixelcam", {})
    for key, label in (("test_accuracy", "test accuracy %"), ("test_pxap", "test PxAP %"),
                       ("test_dice_fg", "test Dice %")):
        if pixelcam.get(key) is not None:
            rows.append((label, f"{pixelcam[key]:.1f}"))
    return "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows if v is not None)


def render_report(out_dir: str | os.PathLike[str], slide_path: str | os.PathLike[str], *,
                  mpp_override: float | None = None, title: str | None = None) -> str:
    """The report's HTML for the analysis in `out_dir` of the slide at `slide_path`."""
    out = Path(out_dir)
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    call, evidence, prov = result.get("classification", {}), result.get("evidence", {}), result.get("provenance", {})
    slide_doc = prov.get("slide", {})
    metadata = prov.get("model", {}).get("metadata", {})
    regions = (evidence.get("top_regions") or [])[:TOP_REGIONS]
    offset = tuple(result.get("frame", {}).get("l0_offset_xy") or (0, 0))
    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        thumb = slide.thumbnail((THUMB_SIDE, THUMB_SIDE))
        crops = _region_crops(slide, regions, (int(offset[0]), int(offset[1])))
    label = call.get("label")
    positive = label is not None and label == call.get("positive_class")
    css_class = "none" if label is None else "pos" if positive else "neg"
    headline = (f"{_esc(label)} &nbsp;·&nbsp; p = {call.get('probability', 0):.3f}" if label is not None
                else _esc(result.get("message", "no call")))
    overlay = out / "overlay.png"
    region_html = "".join(
        f"<figure><img alt='region {i + 1}' src='{_png_uri(c)}' width='{c.shape[1]}' height='{c.shape[0]}'>"
        f"<figcaption>#{i + 1}: {r['area_um2'] / 1e6:.3f} mm², mean p {r['mean_probability']:.2f}, max "
        f"{r['max_probability']:.2f}</figcaption></figure>" for i, (r, c) in enumerate(zip(regions, crops, strict=True)))
    mm2 = (("tissue area", evidence.get("tissue_area_mm2")), ("analysed area", evidence.get("analysed_area_mm2")),
           ("positive area", evidence.get("positive_area_mm2")))
    evidence_rows = "".join(f"<tr><th>{k}</th><td>{v:.3f} mm²</td></tr>" for k, v in mm2 if v is not None)
    evidence_rows += (f"<tr><th>positive share of tissue</th><td>{100 * evidence.get('positive_fraction_of_tissue', 0):.1f}"
                      f" %</td></tr><tr><th>tiles analysed</th><td>{evidence.get('tiles_analysed')}</td></tr>"
                      f"<tr><th>positive regions</th><td>{evidence.get('regions')}</td></tr>"
                      f"<tr><th>threshold τ</th><td>{evidence.get('threshold')}</td></tr>")
    mpp_source = slide_doc.get("mpp_source", "unknown")
    caveats = [
        "Research use only. Not a medical device and not for diagnosis: a pathologist's reading decides.",
        f"Scale: {slide_doc.get('mpp_x', '?')} µm/px, from {_esc(mpp_source)}"
        + (" (set by the user for this job)" if mpp_override else "") + ". A wrong scale changes every area.",
        f"The model was trained on {_esc(metadata.get('provenance', {}).get('dataset', 'its training set'))}; other "
        "tissues, stains or scanners are outside what it was checked on.",
        "Only tissue tiles were analysed (areas in grey on the overlay were not); cells off the tissue mask count as 0.",
    ]
    if result.get("status") != "ok":
        caveats.insert(0, f"The analysis did not make a call: {_esc(result.get('message', ''))}")
    why = call.get("aggregation", {}).get("why", "")
    name = title or slide_doc.get("name", Path(slide_path).name)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pixelcam report: {_esc(name)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<style>{_CSS}</style></head>
<body>
<h1>pixelcam slide report: {_esc(name)}</h1>
<div class="small">slide SHA-256 <code>{_esc(slide_doc.get('sha256') or '-')}</code></div>
<div class="call {css_class}" id="call">{headline}</div>
<p class="small" id="why">{_esc(why)}</p>
<div class="pair">
<figure><img alt="slide thumbnail" src="{_png_uri(thumb)}" width="{thumb.shape[1]}" height="{thumb.shape[0]}">
<figcaption>The slide ({slide_doc.get('l0_size_wh', ['?', '?'])[0]} x {slide_doc.get('l0_size_wh', ['?', '?'])[1]} px
at level 0)</figcaption></figure>
<figure><img alt="heatmap overlay" src="{_file_uri(overlay)}" style="max-width:{THUMB_SIDE}px;height:auto">
<figcaption>Foreground probability over the slide, with its colour bar, scale bar and the call</figcaption></figure>
</div>
<h2>Evidence</h2>
<table id="evidence">{evidence_rows}</table>
<h2>Largest positive regions</h2>
<div class="regions" id="regions">{region_html or '<p>none</p>'}</div>
<h2>Model</h2>
<table id="model"><tr><th>SHA-256</th><td><code>{_esc(prov.get('model', {}).get('sha256', '-'))}</code></td></tr>
{_metrics_rows(metadata)}</table>
<h2>Caveats</h2>
<div class="caveat" id="caveats"><ul>{''.join(f'<li>{c}</li>' for c in caveats)}</ul></div>
<h2>Provenance</h2>
<pre class="small">{_esc(json.dumps({k: v for k, v in prov.items() if k != 'model'}, indent=1)[:6000])}</pre>
</body></html>
"""


def write_html_report(out_dir: str | os.PathLike[str], slide_path: str | os.PathLike[str], *,
                      mpp_override: float | None = None, title: str | None = None) -> Path:
    """Write report.html into `out_dir` (atomically); returns its path."""
    out = Path(out_dir)
    text = render_report(out, slide_path, mpp_override=mpp_override, title=title)
    path = out / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
