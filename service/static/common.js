// Shared helpers of the pixelcam pages: JSON fetch with the API's error messages, the upload form.
"use strict";

async function fetchJSON(url, options) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (err) { body = { detail: text }; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fillTable(table, rows) {
  table.replaceChildren(...rows.map(([key, value]) => {
    const tr = el("tr");
    tr.append(el("th", {}, key), el("td", {}, value));
    return tr;
  }));
}

// The one-shot upload + analysis endpoint: the raw file is the request body.
function wireUploadForm() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const status = document.getElementById("upload-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = document.getElementById("upload-file").files[0];
    if (!file) return;
    const params = new URLSearchParams({ filename: file.name });
    const mpp = document.getElementById("upload-mpp").value;
    if (mpp) params.set("mpp", mpp);
    const button = document.getElementById("upload-button");
    button.disabled = true;
    status.classList.remove("error");
    status.textContent = `uploading ${file.name} (${(file.size / 1e6).toFixed(1)} MB)…`;
    try {
      const job = await fetchJSON(`/v1/analyze?${params}`, {
        method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
      });
      window.location.href = `/viewer/${job.slide_id}?job=${job.job_id}`;
    } catch (err) {
      status.classList.add("error");
      status.textContent = err.message;
      button.disabled = false;
    }
  });
}

wireUploadForm();
