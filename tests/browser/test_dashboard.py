"""The dashboard, the job report and /docs in a real headless Chromium against a real uvicorn,
with every request to another host blocked and recorded (none may be attempted) and every
console error and page error collected (none may happen).

Jobs are rows written into the store (tests/reportdata.py): two finished ones, a running one
whose progress the test advances, one with hostile text in its fields, and another tenant's.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx
import pytest

from api.charts import report_series
from store.db import migrate
from store.settings import Settings
from tests.browser.conftest import chromium_or_fail
from tests.live import running_api
from tests.reportdata import BUDGET, CATEGORIES, FINAL_FORGETTING, add_job, advance, new_tenant

pytestmark = pytest.mark.slow

HOSTILE = '<img src=x onerror="window.__pwned=1">'
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    settings = Settings(data_dir=tmp / "data", secret_key="test-secret")
    migrate(settings)
    alice_id, alice_key = new_tenant(settings, "alice")
    bob_id, _ = new_tenant(settings, "bob")
    jobs = {"sft": add_job(settings, alice_id, "supervised", suffix="sft-run"),
            "sd": add_job(settings, alice_id, "self_distillation", suffix="sd-run"),
            "running": add_job(settings, alice_id, "self_distillation", running_at=40,
                               suffix="live-run"),
            "hostile": add_job(settings, alice_id, suffix=HOSTILE[:64],
                               metadata={"note": HOSTILE}),
            "bob": add_job(settings, bob_id, suffix="bob-secret")}
    with running_api(settings, tmp / "api.log") as url:
        yield {"url": url, "settings": settings, "key": alice_key, "jobs": jobs}


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_fail()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Watched:
    """A page whose requests to any other host are refused, and whose errors are kept."""

    def __init__(self, browser, url: str):
        self.origin = urlsplit(url).netloc
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                           accept_downloads=True)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.elsewhere, self.errors = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route):
        if urlsplit(route.request.url).netloc != self.origin:
            self.elsewhere.append(route.request.url)
            return route.abort()
        return route.continue_()

    def assert_clean(self):
        assert self.elsewhere == [], f"requests to other hosts: {self.elsewhere}"
        assert self.errors == [], f"console errors: {self.errors}"


@pytest.fixture
def watched(browser, site):
    w = Watched(browser, site["url"])
    yield w
    w.context.close()


# The rendered elements of every dataset of the chart on `canvas`: Chart.js's own record of
# where it drew each point, with the pixel its scales give for the point's value.
RENDERED = """canvas => {
  const chart = Chart.getChart(canvas);
  const area = chart.chartArea;
  return chart.data.datasets.map((d, i) => {
    const meta = chart.getDatasetMeta(i);
    return {label: d.label, type: meta.type, values: d.data, points: meta.data.map((p, j) => {
      const v = d.data[j];
      const expected = typeof v === "object" ? [chart.scales.x.getPixelForValue(v.x),
        chart.scales.y.getPixelForValue(v.y)] : [null, chart.scales.y.getPixelForValue(v)];
      return {x: p.x, y: p.y, expected,
              inside: p.x >= area.left - 1 && p.x <= area.right + 1 &&
                      p.y >= area.top - 1 && p.y <= area.bottom + 1};
    })};
  });
}"""


def rendered(locator) -> dict:
    datasets = locator.evaluate(RENDERED)
    for d in datasets:
        for p in d["points"]:
            assert p["inside"], (d["label"], p)
            if p["expected"][0] is not None:
                assert abs(p["x"] - p["expected"][0]) < 1, (d["label"], p)
            assert abs(p["y"] - p["expected"][1]) < 1, (d["label"], p)
    return {d["label"]: d for d in datasets}


def sign_in(w: Watched, url: str, key: str) -> None:
    w.page.goto(url + "/")
    w.page.fill("#api-key", key)
    w.page.click("#login button[type=submit]")


def test_a_wrong_key_is_refused_with_a_clear_message(watched, site):
    sign_in(watched, site["url"], "sk-not-a-key")
    error = watched.page.locator("#login-error")
    error.wait_for(state="visible")
    assert "not accepted" in error.inner_text()
    assert watched.page.locator("#jobs").is_hidden()
    assert watched.page.evaluate("sessionStorage.length") == 0
    watched.errors = [e for e in watched.errors if "401" not in e]  # the refused request itself
    watched.assert_clean()


def test_dashboard_jobs_progress_report_and_comparison(watched, site, screenshots):
    page, jobs, url = watched.page, site["jobs"], site["url"]
    sign_in(watched, url, site["key"])
    page.locator(f'tr[data-job-id="{jobs["sft"]}"]').wait_for()
    assert page.locator("#login").is_hidden() and page.locator("#sign-out").is_visible()

    # The tenant's jobs, and nothing of the other tenant's; the key is in sessionStorage only.
    listed = page.locator("#job-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.jobId)")
    assert set(listed) == {jobs[k] for k in ("sft", "sd", "running", "hostile")}
    assert jobs["bob"] not in page.content() and "bob-secret" not in page.content()
    assert site["key"] not in page.url and watched.context.cookies() == []
    assert page.evaluate("sessionStorage.getItem('driftsafe.apiKey')") == site["key"]

    # Client text is shown as text.
    hostile_row = page.locator(f'tr[data-job-id="{jobs["hostile"]}"]')
    assert hostile_row.locator('td[data-field="name"]').inner_text() == HOSTILE[:64]
    assert page.evaluate("window.__pwned") is None

    # The running job's bar moves as the worker (here: the test) records steps.
    bar = page.locator(f'tr[data-job-id="{jobs["running"]}"] [role=progressbar]')
    assert bar.get_attribute("aria-valuenow") == "40"
    advance(site["settings"], jobs["running"], 120)
    page.wait_for_function(
        "id => document.querySelector(`tr[data-job-id='${id}'] [role=progressbar]`)"
        ".getAttribute('aria-valuenow') === '120'", arg=jobs["running"])
    page.screenshot(path=screenshots / "dashboard.png", full_page=True)

    # A finished job's report: every curve drawn, from the objects the API serves.
    frame = open_report(page, jobs["sd"])
    facts = rendered(frame.locator('canvas[data-chart="facts"]'))
    for label in ("new-fact accuracy", "held-out known accuracy", "forgetting",
                  "hallucination rate"):
        assert len(facts[label]["points"]) == 4, label
    assert facts["new-fact accuracy"]["values"][-1]["y"] > 0.99
    budget = facts["forgetting budget (5.0%)"]
    assert {v["y"] for v in budget["values"]} == {BUDGET}
    safe = facts["drift-safe checkpoint (step 100)"]
    assert safe["type"] == "scatter" and len(safe["points"]) == 1
    losses = rendered(frame.locator('canvas[data-chart="loss"]'))
    assert len(losses["train loss"]["points"]) == 20 == len(losses["distill loss"]["points"])
    bars = rendered(frame.locator('canvas[data-chart="categories"]'))["training examples"]
    assert bars["values"] == list(CATEGORIES.values()) and len(bars["points"]) == 4
    # The browser reads the JSON as the server's report_series does.
    data = json.loads(frame.locator("#report-data").text_content())
    in_browser = frame.evaluate(
        "d => DriftsafeReport.seriesFrom(d.job, d.events, d.checkpoints)", data)
    assert in_browser == report_series(data["job"], data["events"], data["checkpoints"])
    page.screenshot(path=screenshots / "report.png", full_page=True)

    # The running job's report follows it.
    frame = open_report(page, jobs["running"])
    before = len(rendered(frame.locator('canvas[data-chart="facts"]'))["forgetting"]["points"])
    advance(site["settings"], jobs["running"], 180)
    frame.wait_for_function(f"() => Number(document.getElementById('report').dataset.points)"
                            f" > {before}")
    assert len(rendered(frame.locator('canvas[data-chart="facts"]'))["forgetting"][
        "points"]) == 3 > before
    page.click("#close-report")

    # Two jobs on one chart: new-fact accuracy against forgetting, the budget drawn.
    for key in ("sft", "sd"):
        page.check(f'tr[data-job-id="{jobs[key]}"] input[type=checkbox]')
    page.click("#compare")
    page.wait_for_function("() => Chart.getChart(document.getElementById('compare-chart'))")
    curves = rendered(page.locator("#compare-chart"))
    for key, suffix in (("sft", "sft-run"), ("sd", "sd-run")):
        curve = curves[f"{suffix} ({jobs[key][-6:]})"]
        assert len(curve["points"]) == 4
        method = "supervised" if key == "sft" else "self_distillation"
        assert curve["values"][-1]["x"] == pytest.approx(FINAL_FORGETTING[method])
    assert {v["x"] for v in curves["forgetting budget (5.0%)"]["values"]} == {BUDGET}
    page.locator("#compare-panel").screenshot(path=screenshots / "compare.png")

    # The report image, downloaded through the dashboard with the key in a header.
    open_report(page, jobs["sft"])
    with page.expect_download() as download:
        page.click("#report-png")
    assert download.value.path().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.evaluate("window.__pwned") is None
    watched.assert_clean()


def open_report(page, job_id: str):
    page.click(f'tr[data-job-id="{job_id}"] button.open-report')
    page.wait_for_function(
        "id => { const f = document.getElementById('report-frame').contentDocument;"
        " const d = f && f.getElementById('report-data');"
        " const r = f && f.getElementById('report');"
        " return d && JSON.parse(d.textContent).job.id === id && r && r.dataset.points; }",
        arg=job_id)
    return page.frame(name="report")


def test_docs_render_with_the_network_off(watched, site, screenshots):
    watched.page.goto(site["url"] + "/docs")
    watched.page.locator(".swagger-ui .opblock").first.wait_for()
    assert watched.page.locator(".swagger-ui .opblock").count() >= 15
    assert "driftsafe" in watched.page.locator(".swagger-ui .title").inner_text()
    watched.page.screenshot(path=screenshots / "docs.png")
    watched.assert_clean()


def test_report_page_alone_needs_the_key(site):
    # A browser that opens the report URL itself sends no key: 401, like every route.
    r = httpx.get(f"{site['url']}/v1/fine_tuning/jobs/{site['jobs']['sft']}/report")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
