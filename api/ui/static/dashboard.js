// The dashboard: sign in with a key, watch the tenant's jobs, open a job's report, compare jobs.
// Everything it shows comes from the JSON routes with the key as a bearer header; every job
// field is put into the page as text.
(function () {
  "use strict";

  const D = window.Driftsafe;
  const R = window.DriftsafeReport;
  const POLL_MS = 1500;
  const $ = (id) => document.getElementById(id);
  const el = (...args) => R.el(...args);

  let jobs = new Map(); // id -> job object, as last listed
  const selected = new Set();
  let pollTimer = null;
  let compare = null; // {ids, chart, data: Map(id -> {events, checkpoints})}

  function showLoginError(message) {
    $("login-error").textContent = message;
    $("login-error").hidden = !message;
  }

  async function listJobs(apiKey) {
    const body = await D.request("/v1/fine_tuning/jobs?limit=100", { apiKey });
    return body.data;
  }

  async function signIn(apiKey) {
    let listed;
    try {
      listed = await listJobs(apiKey);
    } catch (error) {
      window.sessionStorage.removeItem(D.KEY);
      showLoginError(error.status === 401
        ? "That API key was not accepted (" + error.message + ") Check it and sign in again."
        : "Could not list jobs: " + error.message);
      return;
    }
    window.sessionStorage.setItem(D.KEY, apiKey);
    showLoginError("");
    $("api-key").value = "";
    $("login").hidden = true;
    $("jobs").hidden = false;
    $("sign-out").hidden = false;
    showJobs(listed);
    schedulePoll();
  }

  function signOut(message = "") {
    window.sessionStorage.removeItem(D.KEY);
    window.clearTimeout(pollTimer);
    pollTimer = null;
    jobs = new Map();
    selected.clear();
    closeCompare();
    closeReport();
    $("job-table").tBodies[0].replaceChildren();
    $("jobs").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    showLoginError(message);
  }

  function rowFor(job) {
    let row = $("job-table").querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
    if (row) return row;
    const box = el("input", { type: "checkbox", "aria-label": "select " + job.id });
    box.checked = selected.has(job.id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id); else selected.delete(job.id);
      $("compare").disabled = selected.size < 2;
    });
    const open = el("button", { type: "button", class: "open-report" }, "report");
    open.addEventListener("click", () => openReport(job.id));
    row = el("tr", { "data-job-id": job.id });
    row.append(el("td", {}, box), el("td", { class: "id" }, job.id));
    for (const field of ["name", "method", "status", "progress", "new_fact", "forgetting",
      "drift_safe"]) {
      row.append(el("td", { "data-field": field }));
    }
    row.append(el("td", {}, open));
    return row;
  }

  function fill(row, job) {
    const ev = job.evaluation || {};
    const cell = (field) => row.querySelector('td[data-field="' + field + '"]');
    cell("name").textContent = job.user_provided_suffix || "—";
    cell("name").title = job.metadata ? JSON.stringify(job.metadata) : "";
    cell("method").textContent = (job.method || {}).type || "—";
    cell("status").textContent = job.status;
    cell("status").className = "status " + job.status;
    cell("progress").replaceChildren(R.progressBar(job));
    cell("new_fact").textContent = R.pct(ev.new_fact_accuracy);
    cell("forgetting").textContent = R.pct(ev.forgetting);
    cell("drift_safe").textContent = ev.drift_safe == null ? "—" : ev.drift_safe ? "yes" : "no";
  }

  function showJobs(listed) {
    jobs = new Map(listed.map((j) => [j.id, j]));
    const body = $("job-table").tBodies[0];
    const rows = listed.map((job) => {
      const row = rowFor(job);
      fill(row, job);
      return row;
    });
    body.replaceChildren(...rows); // existing rows move; their checkboxes and buttons stay
    $("no-jobs").hidden = listed.length > 0;
    $("jobs-status").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function schedulePoll() {
    window.clearTimeout(pollTimer);
    pollTimer = window.setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const apiKey = D.key();
    if (!apiKey) return;
    try {
      showJobs(await listJobs(apiKey));
      if (compare && compare.ids.some((id) => !D.FINISHED.has((jobs.get(id) || {}).status))) {
        await refreshCompare();
      }
    } catch (error) {
      if (error.status === 401) {
        signOut("The API key stopped working (" + error.message + ") Sign in again.");
        return;
      }
      $("jobs-status").textContent = "refresh failed: " + error.message;
    }
    schedulePoll();
  }

  async function openReport(id) {
    closeCompare();
    $("report-title").textContent = "Report: " + R.jobLabel(jobs.get(id) || { id });
    $("report-panel").hidden = false;
    $("report-panel").dataset.jobId = id;
    try {
      // The page's scripts run in a same-origin frame: they find the key in sessionStorage and
      // follow the job while it runs.
      $("report-frame").srcdoc = await D.request(D.jobPath(id) + "/report", { as: "text" });
    } catch (error) {
      $("report-frame").srcdoc = "";
      $("report-title").textContent = "Report unavailable: " + error.message;
    }
  }

  function closeReport() {
    $("report-panel").hidden = true;
    $("report-frame").srcdoc = "";
    delete $("report-panel").dataset.jobId;
  }

  async function downloadPng() {
    const id = $("report-panel").dataset.jobId;
    if (!id) return;
    const blob = await D.request(D.jobPath(id) + "/report.png", { as: "blob" });
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: id + "-report.png" });
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#17becf"];

  async function refreshCompare() {
    const current = compare;
    for (const id of current.ids) {
      const held = current.data.get(id) || { events: [] };
      const [events, checkpoints] = await Promise.all([D.events(id, held.events),
        D.checkpoints(id)]);
      if (compare !== current) return; // closed, or another comparison, while reading
      current.data.set(id, { events, checkpoints });
    }
    const datasets = [];
    const budgets = new Set();
    compare.ids.forEach((id, i) => {
      const job = jobs.get(id) || { id };
      const { events, checkpoints } = compare.data.get(id);
      const series = R.seriesFrom(job, events, checkpoints);
      datasets.push({
        label: R.jobLabel(job), showLine: true, borderColor: PALETTE[i % PALETTE.length],
        backgroundColor: PALETTE[i % PALETTE.length], jobId: id,
        data: series.scores.filter((p) => p.forgetting !== null && p.new_fact_accuracy !== null)
          .map((p) => ({ x: p.forgetting, y: p.new_fact_accuracy, step: p.step })),
      });
      if (series.budget !== null) budgets.add(series.budget);
    });
    for (const budget of [...budgets].sort()) {
      datasets.push({
        label: "forgetting budget (" + R.pct(budget) + ")", showLine: true, pointRadius: 0,
        borderColor: R.COLORS.budget, borderDash: [6, 4], budget: true,
        data: [{ x: budget, y: 0 }, { x: budget, y: 1 }],
      });
    }
    if (compare.chart) {
      compare.chart.data.datasets = datasets;
      compare.chart.update("none");
      return;
    }
    const percent = (title) => ({ min: 0, title: { display: true, text: title },
      ticks: { callback: (v) => Math.round(v * 100) + "%" } });
    compare.chart = new window.Chart($("compare-chart"), {
      type: "scatter", data: { datasets },
      options: { animation: false, maintainAspectRatio: false, scales: {
        x: percent("forgetting (held-out known facts the base knew, now wrong)"),
        y: { ...percent("new-fact accuracy"), max: 1 } } },
    });
  }

  async function openCompare() {
    closeReport();
    closeCompare();
    compare = { ids: [...selected], chart: null, data: new Map() };
    $("compare-panel").hidden = false;
    try {
      await refreshCompare();
    } catch (error) {
      $("jobs-status").textContent = "compare failed: " + error.message;
    }
  }

  function closeCompare() {
    if (compare && compare.chart) compare.chart.destroy();
    compare = null;
    $("compare-panel").hidden = true;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault(); // never a form submission: the key stays out of URLs
      signIn($("api-key").value.trim());
    });
    $("sign-out").addEventListener("click", () => signOut());
    $("compare").addEventListener("click", openCompare);
    $("close-compare").addEventListener("click", closeCompare);
    $("close-report").addEventListener("click", closeReport);
    $("report-png").addEventListener("click", () => downloadPng().catch((error) => {
      $("report-title").textContent = "PNG unavailable: " + error.message;
    }));
    if (D.key()) signIn(D.key()); // a reload in the same tab stays signed in
  });
})();
