// Start page: the recent jobs with links into the viewer.
"use strict";

async function loadJobs() {
  const tbody = document.getElementById("jobs");
  try {
    const { jobs } = await fetchJSON("/v1/jobs?limit=50");
    if (!jobs.length) {
      tbody.replaceChildren(el("tr", {}, ""));
      tbody.firstChild.append(el("td", { colspan: 5, class: "muted" }, "no jobs yet: upload a slide above"));
      return;
    }
    tbody.replaceChildren(...jobs.map((job) => {
      const tr = el("tr");
      const link = el("a", { href: `/viewer/${job.slide_id}?job=${job.job_id}` }, "open");
      const cell = el("td");
      cell.append(link);
      tr.append(el("td", {}, job.job_id.slice(0, 12)), el("td", {}, job.slide_id.slice(0, 12)),
        el("td", {}, job.state), el("td", {}, `${Math.round(100 * job.progress)} %`), cell);
      return tr;
    }));
  } catch (err) {
    tbody.replaceChildren(el("tr"));
    tbody.firstChild.append(el("td", { colspan: 5, class: "error" }, err.message));
  }
}

loadJobs();
setInterval(loadJobs, 5000);
