// The slide viewer: OpenSeadragon with the slide, the job's heatmap overlay (its own DZI, same level-0 size),
// GeoJSON outlines drawn in level-0 coordinates, a scale bar from the slide's MPP, live progress and the result.
"use strict";

const slideId = decodeURIComponent(window.location.pathname.split("/").pop());
const query = new URLSearchParams(window.location.search);
const jobId = query.get("job");
const COLORMAPS = ["jet", "viridis", "inferno", "magma", "turbo", "gray"];

const state = {
  slideId, jobId, info: null, job: null, result: null,
  cmap: COLORMAPS.includes(query.get("cmap")) ? query.get("cmap") : "jet",
  threshold: clamp01(parseFloat(query.get("threshold") ?? "0.5"), 0.5),
  opacity: clamp01(parseFloat(query.get("opacity") ?? "0.5"), 0.5),
  version: "0", overlayVersion: null, slideItem: null, overlayItem: null, outlines: [], showOutlines: true, showOverlay: true,
  tilesLoaded: { slide: 0, overlay: 0 }, errors: [],
};
window.pixelcam = state; // inspected by the browser test and handy in the console

function clamp01(value, fallback) {
  return Number.isFinite(value) ? Math.min(1, Math.max(0, value)) : fallback;
}

const viewer = OpenSeadragon({
  id: "osd",
  prefixUrl: "/static/openseadragon/images/",
  drawer: "canvas",
  showNavigator: true,
  navigatorPosition: "TOP_RIGHT",
  maxZoomPixelRatio: 4,
  timeout: 60000,
  tileSources: `/v1/slides/${slideId}.dzi`,
});

window.pixelcamViewer = viewer;

viewer.addHandler("tile-loaded", (event) => {
  const url = (event.tiledImage && event.tiledImage.source && event.tiledImage.source.tilesUrl) || "";
  if (url.includes("/overlay_files/")) state.tilesLoaded.overlay += 1;
  else state.tilesLoaded.slide += 1;
});
viewer.addHandler("tile-load-failed", (event) => state.errors.push(String(event.message)));
viewer.addHandler("open-failed", (event) => state.errors.push(`open failed: ${event.message}`));
viewer.addHandler("open", () => {
  state.slideItem = viewer.world.getItemAt(0);
  if (jobId) setOverlay();
  redraw();
});
viewer.addHandler("update-viewport", redraw);
window.addEventListener("resize", redraw);

// --- heatmap overlay ---------------------------------------------------------------------------------------------

function overlayUrl() {
  const params = new URLSearchParams({ cmap: state.cmap, threshold: state.threshold.toFixed(2), v: state.version });
  return `/v1/jobs/${jobId}/overlay.dzi?${params}`;
}

// Add the overlay with the current parameters; once it is in, drop every older overlay (no flicker while tiles
// load). Only the latest request wins when several are in flight (progress events, colour map changes).
let overlayRequest = 0;

function setOverlay() {
  if (!state.slideItem) return;
  const request = ++overlayRequest;
  const version = state.version;
  viewer.addTiledImage({
    tileSource: overlayUrl(),
    opacity: state.showOverlay ? state.opacity : 0,
    success: (event) => {
      if (request !== overlayRequest) { viewer.world.removeItem(event.item); return; }
      for (let i = viewer.world.getItemCount() - 1; i >= 0; i--) {
        const item = viewer.world.getItemAt(i);
        if (item !== event.item && item !== state.slideItem) viewer.world.removeItem(item);
      }
      state.overlayItem = event.item;
      state.overlayVersion = version;
    },
    error: (event) => state.errors.push(`overlay: ${event.message}`),
  });
}

// A running job lands chunks quickly: swap the overlay at most every few seconds (each swap refetches the
// visible tiles), at once when the job is done.
const OVERLAY_REFRESH_MS = 3000;
let overlayTimer = null;
let lastOverlayAt = 0;

function refreshOverlay(now) {
  clearTimeout(overlayTimer);
  const wait = now ? 0 : Math.max(0, OVERLAY_REFRESH_MS - (Date.now() - lastOverlayAt));
  overlayTimer = setTimeout(() => { lastOverlayAt = Date.now(); setOverlay(); }, wait);
}

function wireControls() {
  const cmap = document.getElementById("cmap");
  cmap.replaceChildren(...COLORMAPS.map((name) => el("option", { value: name }, name)));
  cmap.value = state.cmap;
  cmap.addEventListener("change", () => { state.cmap = cmap.value; setOverlay(); });
  const opacity = document.getElementById("opacity");
  opacity.value = state.opacity;
  opacity.addEventListener("input", () => {
    state.opacity = parseFloat(opacity.value);
    if (state.overlayItem && state.showOverlay) state.overlayItem.setOpacity(state.opacity);
  });
  const threshold = document.getElementById("threshold");
  const thresholdValue = document.getElementById("threshold-value");
  threshold.value = state.threshold;
  thresholdValue.textContent = state.threshold.toFixed(2);
  threshold.addEventListener("input", () => { thresholdValue.textContent = parseFloat(threshold.value).toFixed(2); });
  threshold.addEventListener("change", () => { state.threshold = parseFloat(threshold.value); setOverlay(); });
  document.getElementById("show-overlay").addEventListener("change", (event) => {
    state.showOverlay = event.target.checked;
    if (state.overlayItem) state.overlayItem.setOpacity(state.showOverlay ? state.opacity : 0);
  });
  document.getElementById("show-outlines").addEventListener("change", (event) => {
    state.showOutlines = event.target.checked;
    redraw();
  });
  document.getElementById("geojson-link").href = `/v1/jobs/${jobId}/geojson?download=true`;
  document.getElementById("tif-link").href = `/v1/jobs/${jobId}/heatmap.tif`;
}

// --- outlines (GeoJSON, level-0 pixels) and the scale bar --------------------------------------------------------

const outlineCanvas = document.getElementById("outlines");

function ringPath(path, ring) {
  ring.forEach(([x, y], i) => (i === 0 ? path.moveTo(x, y) : path.lineTo(x, y)));
  path.closePath();
}

function toOutlines(collection) {
  const outlines = [];
  for (const feature of collection.features || []) {
    const props = feature.properties || {};
    const kind = props.objectType || "annotation";
    if (kind !== "annotation" || !feature.geometry) continue;
    const geom = feature.geometry;
    const polygons = geom.type === "Polygon" ? [geom.coordinates] : geom.type === "MultiPolygon" ? geom.coordinates : [];
    const path = new Path2D();
    polygons.forEach((rings) => rings.forEach((ring) => ringPath(path, ring)));
    const rgb = (props.classification && props.classification.color) || [255, 140, 0];
    outlines.push({ path, color: `rgb(${rgb.slice(0, 3).join(",")})` });
  }
  return outlines;
}

function redraw() {
  const box = outlineCanvas.parentElement.getBoundingClientRect();
  const ratio = window.devicePixelRatio || 1;
  if (outlineCanvas.width !== Math.round(box.width * ratio)) outlineCanvas.width = Math.round(box.width * ratio);
  if (outlineCanvas.height !== Math.round(box.height * ratio)) outlineCanvas.height = Math.round(box.height * ratio);
  outlineCanvas.style.width = `${box.width}px`;
  outlineCanvas.style.height = `${box.height}px`;
  const ctx = outlineCanvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, outlineCanvas.width, outlineCanvas.height);
  if (!state.slideItem) return;
  // image (level-0) -> element pixels is a scale plus an offset
  const origin = state.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const unit = state.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(1, 0));
  const scale = unit.x - origin.x; // element px per level-0 px
  if (state.showOutlines && state.outlines.length) {
    ctx.setTransform(scale * ratio, 0, 0, scale * ratio, origin.x * ratio, origin.y * ratio);
    ctx.lineWidth = 2 / scale;
    for (const outline of state.outlines) {
      ctx.strokeStyle = outline.color;
      ctx.stroke(outline.path);
    }
  }
  drawScaleBar(scale);
}

// microns per level-0 pixel: the slide's own, else the override the job ran with (`mpp` in the request)
function slideMpp() {
  if (state.info && state.info.mpp_x) return { value: state.info.mpp_x, source: state.info.mpp_source };
  if (state.job && state.job.mpp) return { value: state.job.mpp, source: "job's mpp override" };
  return null;
}

function fillSlideTable() {
  const info = state.info;
  if (!info) return;
  const mpp = slideMpp();
  fillTable(document.getElementById("slide-info"), [
    ["size", `${info.width} × ${info.height} px`],
    ["µm/px", mpp ? `${mpp.value.toFixed(4)} (${mpp.source})` : "unknown (no scale bar)"],
    ["objective", info.objective_power ? `${info.objective_power}×` : "–"],
    ["vendor", info.vendor || "–"],
    ["levels", `${info.slide_level_count} in the file (${info.level_count} Deep Zoom)`],
  ]);
}

function drawScaleBar(scale) {
  const bar = document.getElementById("scalebar");
  const mpp = slideMpp() && slideMpp().value;
  if (!mpp || !(scale > 0)) { bar.hidden = true; return; }
  const micronsPerScreenPx = mpp / scale;
  const target = 120 * micronsPerScreenPx; // aim for a bar of about 120 px
  const magnitude = 10 ** Math.floor(Math.log10(target));
  const nice = [1, 2, 5, 10].map((m) => m * magnitude).filter((v) => v <= target).pop() || magnitude;
  bar.hidden = false;
  bar.querySelector(".bar").style.width = `${nice / micronsPerScreenPx}px`;
  bar.querySelector(".label").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`;
}

// --- slide info, job progress and result -------------------------------------------------------------------------

async function loadSlideInfo() {
  try {
    state.info = await fetchJSON(`/v1/slides/${slideId}/deepzoom`);
    const info = state.info;
    document.getElementById("title").textContent = `${info.name} · ${slideId.slice(0, 12)}`;
    fillSlideTable();
    redraw();
  } catch (err) {
    state.errors.push(err.message);
  }
}

function showJob(job) {
  const mppChanged = !state.job || state.job.mpp !== job.mpp;
  state.job = job;
  if (mppChanged) { fillSlideTable(); redraw(); }
  document.getElementById("progress-bar").style.width = `${Math.round(100 * job.progress)}%`;
  const parts = [job.state];
  if (job.tiles_total !== null) parts.push(`${job.tiles_done} / ${job.tiles_total} tiles`);
  if (job.throughput_tiles_per_s) parts.push(`${job.throughput_tiles_per_s.toFixed(1)} tiles/s`);
  if (job.eta_s && job.state === "running") parts.push(`ETA ${Math.ceil(job.eta_s)} s`);
  if (job.error) parts.push(job.error);
  document.getElementById("job-state").textContent = parts.join(" · ");
  const version = `${job.state}-${job.chunks_done}`;
  if (version !== state.version && (job.chunks_done > 0 || job.state === "done")) {
    state.version = version;
    refreshOverlay(job.state === "done");
  }
  if (job.state === "done" && !state.result) loadResult();
}

function scalar(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  return typeof value === "string" || typeof value === "boolean" ? String(value) : null;
}

async function loadResult() {
  state.result = {};
  try {
    const result = await fetchJSON(`/v1/jobs/${jobId}/result`);
    state.result = result;
    const call = result.classification || {};
    const name = call.label || (result.status === "no_tissue" ? "no tissue" : "?");
    document.getElementById("result-class").textContent =
      typeof call.probability === "number" ? `${name} (${(100 * call.probability).toFixed(1)} %)` : name;
    const evidence = result.evidence || {};
    const rows = Object.entries(evidence).map(([k, v]) => [k.replaceAll("_", " "), scalar(v)]).filter(([, v]) => v !== null);
    if (typeof call.positive_probability === "number") {
      rows.unshift([`p(${call.positive_class})`, call.positive_probability.toFixed(3)]);
    }
    if (result.message) rows.push(["note", result.message]);
    // the model's own threshold (from its validation data) unless the URL chose one
    if (!query.has("threshold") && typeof evidence.threshold === "number" && evidence.threshold !== state.threshold) {
      state.threshold = evidence.threshold;
      document.getElementById("threshold").value = state.threshold;
      document.getElementById("threshold-value").textContent = state.threshold.toFixed(2);
      setOverlay();
    }
    fillTable(document.getElementById("evidence"), rows);
    document.getElementById("result").hidden = false;
  } catch (err) {
    state.errors.push(`result: ${err.message}`);
  }
  try {
    state.outlines = toOutlines(await fetchJSON(`/v1/jobs/${jobId}/geojson`));
    redraw();
  } catch (err) {
    state.errors.push(`geojson: ${err.message}`);
  }
}

function followJob() {
  document.getElementById("job-section").hidden = false;
  document.getElementById("overlay-section").hidden = false;
  document.getElementById("job-id").textContent = jobId.slice(0, 12);
  wireControls();
  const poll = async () => {
    try {
      const job = await fetchJSON(`/v1/jobs/${jobId}`);
      showJob(job);
      if (!["done", "failed", "cancelled"].includes(job.state)) setTimeout(poll, 2000);
    } catch (err) {
      state.errors.push(err.message);
      setTimeout(poll, 5000);
    }
  };
  if (!window.EventSource) { poll(); return; }
  const events = new EventSource(`/v1/jobs/${jobId}/events`);
  events.addEventListener("progress", (event) => showJob(JSON.parse(event.data)));
  events.addEventListener("end", () => events.close());
  events.onerror = () => { events.close(); if (!state.job || state.job.state !== "done") poll(); };
}

loadSlideInfo();
if (jobId) followJob();
