// The browser's client of the JSON API: the key lives in this tab's sessionStorage and travels
// only as a bearer header (never in a URL, never in a cookie). Shared by the dashboard and the
// report page (which, inside the dashboard, is a same-origin frame and so sees the same key).
(function () {
  "use strict";

  const KEY = "driftsafe.apiKey";

  class APIError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function key() {
    return window.sessionStorage.getItem(KEY);
  }

  async function request(path, { apiKey = key(), as = "json" } = {}) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + apiKey },
      cache: "no-store",
      credentials: "omit",
    });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        message = (await response.json()).error.message || message;
      } catch (e) {
        // not the error envelope (a proxy's page, a dropped connection): keep the status
      }
      throw new APIError(response.status, message);
    }
    return as === "json" ? response.json() : as === "text" ? response.text() : response.blob();
  }

  const jobPath = (id) => "/v1/fine_tuning/jobs/" + encodeURIComponent(id);

  // A job's events, newest first, by the API's own paging. With `known` (the events already
  // held), paging stops at the first one already held: a refresh reads only what is new.
  async function events(jobId, known = []) {
    const seen = new Set(known.map((e) => e.id));
    const fresh = [];
    let after = null;
    for (let page = 0; page < 100; page++) {
      const query = "?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
      const body = await request(jobPath(jobId) + "/events" + query);
      const unseen = body.data.filter((e) => !seen.has(e.id));
      fresh.push(...unseen);
      if (!body.has_more || unseen.length < body.data.length) break;
      after = body.last_id;
    }
    return fresh.concat(known);
  }

  async function checkpoints(jobId) {
    const all = [];
    let after = null;
    for (let page = 0; page < 100; page++) {
      const query = "?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
      const body = await request(jobPath(jobId) + "/checkpoints" + query);
      all.push(...body.data);
      if (!body.has_more) break;
      after = body.last_id;
    }
    return all;
  }

  // Statuses after which a job's objects no longer change.
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

  window.Driftsafe = { KEY, APIError, key, request, jobPath, events, checkpoints, FINISHED };
})();
