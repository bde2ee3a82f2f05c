// A job's report, drawn with Chart.js from the JSON the API serves: the job object, its metrics
// events and its checkpoints. seriesFrom reads them exactly as api/charts.py report_series does
// (tests/browser compares the two). On the report page the objects come embedded; while the job
// runs and this tab holds a key, the page reads them again every few seconds.
(function () {
  "use strict";

  const SCORE_KEYS = ["new_fact_accuracy", "heldout_known_accuracy", "forgetting",
    "hallucination_rate"];
  const LOSS_KEYS = ["train_loss", "distill_loss"];
  const CATEGORIES = ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"];
  const LABELS = {
    new_fact_accuracy: "new-fact accuracy", heldout_known_accuracy: "held-out known accuracy",
    forgetting: "forgetting", hallucination_rate: "hallucination rate",
    train_loss: "train loss", distill_loss: "distill loss",
  };
  const COLORS = {
    new_fact_accuracy: "#1f77b4", heldout_known_accuracy: "#2ca02c", forgetting: "#d62728",
    hallucination_rate: "#9467bd", train_loss: "#1f77b4", distill_loss: "#ff7f0e",
    budget: "#7f7f7f", safe: "#e6a700",
  };
  const REFRESH_MS = 2000;

  const number = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const pick = (data, keys) => Object.fromEntries(keys.map((k) => [k, number(data[k])]));
  const hasAny = (data, keys) => keys.some((k) => number(data[k]) !== null);

  function seriesFrom(job, events, checkpoints) {
    const scores = new Map();
    const losses = new Map();
    const ordered = [...events].sort((a, b) => (a.created_at || 0) - (b.created_at || 0));
    for (const event of ordered) {
      const data = event.data || {};
      if (event.type !== "metrics" || !Number.isInteger(data.step)) continue;
      if (hasAny(data, SCORE_KEYS)) scores.set(data.step, pick(data, SCORE_KEYS));
      if (number(data.train_loss) !== null) losses.set(data.step, pick(data, LOSS_KEYS));
    }
    const safeSteps = [];
    for (const ckpt of checkpoints) {
      const metrics = ckpt.metrics || {};
      if (hasAny(metrics, SCORE_KEYS)) scores.set(ckpt.step_number, pick(metrics, SCORE_KEYS));
      if (metrics.drift_safe === true) safeSteps.push(ckpt.step_number);
    }
    const evaluation = job.evaluation || {};
    const cats = evaluation.knowledge_categories;
    const bySteps = (m) => [...m.keys()].sort((a, b) => a - b).map((s) => ({ step: s, ...m.get(s) }));
    return {
      scores: bySteps(scores),
      losses: bySteps(losses),
      budget: number(evaluation.max_forgetting),
      drift_safe_step: safeSteps.length ? Math.max(...safeSteps) : null,
      categories: cats ? Object.fromEntries(CATEGORIES.map((c) => [c, Math.trunc(cats[c] || 0)])) : {},
    };
  }

  function jobLabel(job) {
    const name = job.user_provided_suffix || (job.method || {}).type || "job";
    return name + " (" + job.id.slice(-6) + ")";
  }

  // Elements are made here and filled with textContent: a suffix or a metadata value is text.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const pct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%");

  function progressBar(job) {
    const p = job.progress || {};
    const done = job.status === "succeeded";
    const step = done ? 1 : p.step || 0;
    const total = done ? 1 : p.total_steps || 0;
    const fraction = total ? step / total : 0;
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0",
      "aria-valuemax": String(total), "aria-valuenow": String(step) }, el("span"));
    bar.firstChild.style.width = (100 * fraction).toFixed(1) + "%";
    const text = total && !done ? step + "/" + total : done ? "done" : "";
    return el("div", { class: "progress" }, bar, el("span", { class: "muted" }, text));
  }

  const percentAxis = (title) => ({
    min: 0, max: 1, title: { display: !!title, text: title },
    ticks: { callback: (v) => Math.round(v * 100) + "%" },
  });

  function factsConfig(series, job) {
    const line = (key) => ({
      label: LABELS[key], borderColor: COLORS[key], backgroundColor: COLORS[key],
      data: series.scores.filter((p) => p[key] !== null).map((p) => ({ x: p.step, y: p[key] })),
    });
    const datasets = SCORE_KEYS.map(line);
    const lastStep = Math.max((job.progress || {}).total_steps || 0,
      ...series.scores.map((p) => p.step), 1);
    if (series.budget !== null) {
      datasets.push({
        label: "forgetting budget (" + pct(series.budget) + ")", borderColor: COLORS.budget,
        borderDash: [6, 4], pointRadius: 0, data: [{ x: 0, y: series.budget },
          { x: lastStep, y: series.budget }],
      });
    }
    const safe = series.scores.find((p) => p.step === series.drift_safe_step);
    if (safe) {
      datasets.push({
        type: "scatter", label: "drift-safe checkpoint (step " + safe.step + ")", order: -1,
        pointStyle: "rectRot", pointRadius: 9, borderWidth: 2, borderColor: "#ffffff",
        backgroundColor: COLORS.safe, data: [{ x: safe.step, y: safe.forgetting || 0 }],
      });
    }
    return {
      type: "line", data: { datasets },
      options: { scales: { x: { type: "linear", min: 0, title: { display: true, text: "step" } },
        y: percentAxis() }, plugins: { title: { display: true, text: "Facts over training steps" } } },
    };
  }

  function lossConfig(series) {
    const datasets = LOSS_KEYS.map((key) => ({
      label: LABELS[key], borderColor: COLORS[key], backgroundColor: COLORS[key], pointRadius: 0,
      data: series.losses.filter((p) => p[key] !== null).map((p) => ({ x: p.step, y: p[key] })),
    })).filter((d) => d.data.length);
    return {
      type: "line", data: { datasets },
      options: { scales: { x: { type: "linear", title: { display: true, text: "step" } } },
        plugins: { title: { display: true, text: "Loss" } } },
    };
  }

  function categoriesConfig(series) {
    const names = CATEGORIES;
    return {
      type: "bar",
      data: { labels: names, datasets: [{ label: "training examples",
        data: names.map((n) => series.categories[n] || 0),
        backgroundColor: ["#2ca02c", "#bcbd22", "#ff7f0e", "#d62728"] }] },
      options: { plugins: { legend: { display: false }, title: { display: true,
        text: "Training set by SliCK category" + (Object.keys(series.categories).length ? ""
          : " (not measured yet)") } } },
    };
  }

  function summary(job) {
    const ev = job.evaluation || {};
    const rows = [
      ["job", job.id], ["status", job.status], ["method", (job.method || {}).type],
      ["model", job.model], ["name (suffix)", job.user_provided_suffix || "—"],
      ["metadata", job.metadata ? JSON.stringify(job.metadata) : "—"],
      ["new-fact accuracy", pct(ev.new_fact_accuracy)],
      ["held-out known accuracy", pct(ev.heldout_known_accuracy) + " (base " +
        pct(ev.base_heldout_known_accuracy) + ")"],
      ["forgetting", pct(ev.forgetting) + " (budget " + pct(ev.max_forgetting) + ")"],
      ["hallucination rate", pct(ev.hallucination_rate)],
      ["drift-safe", ev.drift_safe === null || ev.drift_safe === undefined ? "—"
        : String(ev.drift_safe)],
    ];
    const dl = el("dl", { class: "summary" });
    for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", { "data-field": k }, v ?? "—"));
    if (job.error) dl.append(el("dt", {}, "error"), el("dd", { class: "error" }, job.error.message));
    return dl;
  }

  // Draws into `root`; returns update(data) which redraws the same charts with new data.
  function render(root, data) {
    const charts = {};
    const canvases = {};
    const head = el("div", { class: "report-head" });
    const grid = el("div", { class: "charts" });
    for (const name of ["facts", "loss", "categories"]) {
      canvases[name] = el("canvas", { "data-chart": name });
      grid.append(el("div", { class: "chart-box" + (name === "facts" ? " wide" : "") },
        canvases[name]));
    }
    root.replaceChildren(head, grid);

    function update({ job, events, checkpoints }) {
      const series = seriesFrom(job, events, checkpoints);
      head.replaceChildren(el("h1", {}, jobLabel(job)), progressBar(job), summary(job));
      const configs = { facts: factsConfig(series, job), loss: lossConfig(series),
        categories: categoriesConfig(series) };
      for (const [name, config] of Object.entries(configs)) {
        if (charts[name]) {
          charts[name].data = config.data;
          charts[name].options = config.options;
          charts[name].update("none");
        } else {
          config.options.animation = false;
          config.options.maintainAspectRatio = false;
          charts[name] = new window.Chart(canvases[name], config);
        }
      }
      root.dataset.status = job.status;
      root.dataset.points = String(series.scores.length);
    }
    update(data);
    return update;
  }

  // The report page: draw the embedded objects; follow the job while it runs, if this tab has
  // a key (inside the dashboard it does; a page saved to disk stays as it was saved).
  function start() {
    const holder = document.getElementById("report-data");
    const root = document.getElementById("report");
    if (!holder || !root) return;
    let data = JSON.parse(holder.textContent);
    const update = render(root, data);
    const follow = async () => {
      if (window.Driftsafe.FINISHED.has(data.job.status) || !window.Driftsafe.key()) return;
      try {
        const id = data.job.id;
        const [job, events, checkpoints] = await Promise.all([
          window.Driftsafe.request(window.Driftsafe.jobPath(id)),
          window.Driftsafe.events(id, data.events.filter((e) => e.type === "metrics")),
          window.Driftsafe.checkpoints(id)]);
        data = { job, events: events.filter((e) => e.type === "metrics"), checkpoints };
        update(data);
      } catch (error) {
        root.dataset.refreshError = error.message;  // the charts keep the last good read
      }
      window.setTimeout(follow, REFRESH_MS);
    };
    window.setTimeout(follow, REFRESH_MS);
  }

  window.DriftsafeReport = { seriesFrom, jobLabel, render, progressBar, el, pct, COLORS };
  document.addEventListener("DOMContentLoaded", start);
})();
