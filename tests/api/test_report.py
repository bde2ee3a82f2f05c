"""The job report (HTML and PNG), the dashboard page and the offline /docs, through the app.
The browser drives them in tests/browser/test_dashboard.py; here: what the routes answer."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageChops

from api.charts import report_series
from tests.live import ROOT
from tests.reportdata import BUDGET, CATEGORIES, add_job, advance, new_tenant


@pytest.fixture
def tenants(client, settings):
    """Alice with a finished SFT job, a finished self-distillation job and a running one; Bob."""
    alice_id, alice_key = new_tenant(settings, "alice")
    _, bob_key = new_tenant(settings, "bob")
    jobs = {"sft": add_job(settings, alice_id, "supervised", suffix="sft"),
            "sd": add_job(settings, alice_id, "self_distillation", suffix="sd"),
            "running": add_job(settings, alice_id, "self_distillation", running_at=60)}
    return ({"Authorization": f"Bearer {alice_key}"}, {"Authorization": f"Bearer {bob_key}"},
            jobs)


def _image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image.convert("RGB")


def test_report_png_is_a_real_chart_that_differs_by_method(client, tenants):
    alice, _, jobs = tenants
    sft = _image(client.get(f"/v1/fine_tuning/jobs/{jobs['sft']}/report.png", headers=alice))
    sd = _image(client.get(f"/v1/fine_tuning/jobs/{jobs['sd']}/report.png", headers=alice))
    assert sft.size[0] >= 400 and sft.size[1] >= 300 and sft.size == sd.size
    assert len(sft.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # drawn, not blank
    diff = ImageChops.difference(sft, sd).convert("L").point(lambda v: 255 if v > 32 else 0)
    changed = sum(diff.histogram()[255:])
    assert changed > 0.01 * sft.size[0] * sft.size[1], changed  # other curves, not a title

    running = _image(client.get(f"/v1/fine_tuning/jobs/{jobs['running']}/report.png",
                                headers=alice))
    assert running.size == sft.size  # drawn before any SliCK counts or final report exist


def test_report_page_embeds_exactly_what_the_json_routes_serve(client, tenants):
    alice, _, jobs = tenants
    r = client.get(f"/v1/fine_tuning/jobs/{jobs['sd']}/report", headers=alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    data = _embedded(r.text)
    base = f"/v1/fine_tuning/jobs/{jobs['sd']}"
    assert data["job"] == client.get(base, headers=alice).json()
    events = client.get(f"{base}/events?limit=100", headers=alice).json()["data"]
    assert data["events"] == [e for e in events if e["type"] == "metrics"]
    assert data["checkpoints"] == client.get(f"{base}/checkpoints?limit=100",
                                             headers=alice).json()["data"]
    series = report_series(data["job"], data["events"], data["checkpoints"])
    assert [p["step"] for p in series["scores"]] == [50, 100, 150, 200]
    assert series["budget"] == BUDGET and series["categories"] == CATEGORIES
    assert series["drift_safe_step"] == 100  # the newest checkpoint within the budget
    assert all(p["distill_loss"] is not None for p in series["losses"])


def test_report_page_escapes_what_a_client_wrote(client, settings):
    tenant_id, key = new_tenant(settings, "mallory")
    hostile = "</script><script>alert(1)</script><!--"
    job = add_job(settings, tenant_id, suffix="x</script>", metadata={"note": hostile})
    r = client.get(f"/v1/fine_tuning/jobs/{job}/report",
                   headers={"Authorization": f"Bearer {key}"})
    raw = r.text.split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in raw and ">" not in raw  # nothing in the data can close its element
    data = _embedded(r.text)
    assert data["job"]["metadata"] == {"note": hostile}
    assert data["job"]["user_provided_suffix"] == "x</script>"


def test_report_routes_answer_401_without_a_key_and_404_for_another_tenant(client, tenants):
    alice, bob, jobs = tenants
    for suffix in ("report", "report.png"):
        url = f"/v1/fine_tuning/jobs/{jobs['sft']}/{suffix}"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = client.get(url, headers=bob)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert client.get(f"/v1/fine_tuning/jobs/ftjob-none/{suffix}",
                          headers=alice).status_code == 404


def test_the_report_follows_a_running_job(client, settings, tenants):
    alice, _, jobs = tenants
    url = f"/v1/fine_tuning/jobs/{jobs['running']}/report"
    first = _embedded(client.get(url, headers=alice).text)
    advance(settings, jobs["running"], 160)
    later = _embedded(client.get(url, headers=alice).text)
    assert first["job"]["progress"]["step"] == 60 and later["job"]["progress"]["step"] == 160
    assert len(report_series(**later)["scores"]) == 3 > len(report_series(**first)["scores"])


def test_the_openapi_document_declares_the_report_routes(client):
    doc = client.get("/openapi.json").json()
    for path, media in (("/v1/fine_tuning/jobs/{job_id}/report", "text/html"),
                        ("/v1/fine_tuning/jobs/{job_id}/report.png", "image/png")):
        responses = doc["paths"][path]["get"]["responses"]
        assert list(responses["200"]["content"]) == [media]
        assert {"401", "404", "429", "500", "503"} <= set(responses)
    assert not any(p in doc["paths"] for p in ("/", "/ui", "/docs"))


def test_dashboard_and_docs_are_served_from_the_package(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    docs = client.get("/docs").text
    for html in (page.text, docs):
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/") for a in assets), assets  # this server only
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
    assert "https://" not in docs.replace("https://swagger.io", "")
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN


def test_the_api_process_loads_neither_torch_nor_matplotlib_at_start(tmp_path):
    code = ("import sys; from api.app import create_app; create_app(); "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"DRIFTSAFE_SECRET_KEY": "x",
                                                      "DRIFTSAFE_DATA_DIR": str(tmp_path),
                                                      "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                      re.S)
    return json.loads(match.group(1))


def test_the_comparison_png_that_the_demo_writes(client, tenants, tmp_path):
    from cli.compare import save_comparison

    alice, _, jobs = tenants
    with TestClient(client.app, base_url="http://testserver/v1", headers=alice) as http:
        path = save_comparison(http, [jobs["sft"], jobs["sd"], jobs["running"]],
                               tmp_path / "compare.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_a_long_job_s_report_draws_at_most_the_cap_of_loss_samples(client, settings):
    """Tens of thousands of loss samples (a job of days) are thinned evenly for the report, the
    newest kept, and every scoring event kept: the page and image stay cheap to build."""
    from api.routes.report import MAX_LOSS_SAMPLES
    from store.db import session_scope
    from store.models import JobEvent

    tenant_id, key = new_tenant(settings, "carol")
    job_id = add_job(settings, tenant_id, "supervised", suffix="long")
    total = 2 * MAX_LOSS_SAMPLES + 500
    with session_scope(settings) as s:  # a diverged stretch too: NaN losses, stored as null
        s.add_all(JobEvent(tenant_id=tenant_id, job_id=job_id, type="metrics",
                           message=f"Step {i}", data={"step": i, "train_loss": (
                               float("nan") if i % 7 == 0 else 1.0 / i)})
                  for i in range(1000, 1000 + total))
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/report",
                   headers={"Authorization": f"Bearer {key}"})
    events = _embedded(r.text)["events"]
    losses = [e for e in events if "train_loss" in e["data"]]  # null ones too
    scores = [e for e in events if "known_accuracy" in e["data"]]
    assert len(losses) == MAX_LOSS_SAMPLES
    assert losses[0]["data"]["step"] == 1000 + total - 1  # the newest sample
    steps = [e["data"]["step"] for e in losses if e["data"]["step"] >= 1000]
    assert steps == sorted(steps, reverse=True)
    assert {a - b for a, b in zip(steps, steps[1:])} <= {2, 3}  # evenly spaced, to within one
    assert [e["data"]["step"] for e in scores] == [200, 150, 100, 50]  # every scoring event
    png = client.get(f"/v1/fine_tuning/jobs/{job_id}/report.png",
                     headers={"Authorization": f"Bearer {key}"})
    assert png.status_code == 200


def test_a_report_reads_samples_stored_with_a_bare_nan_on_sqlite(tmp_path):
    """Rows written before JSON columns went through pydantic-core may hold a bare NaN, which
    SQLite's JSON functions refuse: the report still answers, with every sample. (SQLite only:
    PostgreSQL's json type never took a bare NaN, so no such rows exist there.)"""
    from sqlalchemy import text

    from api.app import create_app
    from api.routes.report import MAX_LOSS_SAMPLES
    from store.db import migrate, session_scope
    from store.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", secret_key="test-secret")
    migrate(settings)

    tenant_id, key = new_tenant(settings, "dave")
    job_id = add_job(settings, tenant_id, "supervised", suffix="old")
    with session_scope(settings) as s:
        for i in range(MAX_LOSS_SAMPLES + 10):
            s.execute(text("INSERT INTO job_events (id, tenant_id, job_id, created_at, level, "
                           "message, type, data) VALUES (:id, :t, :j, 0, 'info', 'Step', "
                           "'metrics', :d)"),
                      {"id": f"ftevent-old{i}", "t": tenant_id, "j": job_id,
                       "d": f'{{"step": {1000 + i}, "train_loss": NaN}}'})
    with TestClient(create_app(settings)) as client:
        r = client.get(f"/v1/fine_tuning/jobs/{job_id}/report",
                       headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert len(_embedded(r.text)["events"]) > MAX_LOSS_SAMPLES + 10
    # and the page's data is JSON a browser parses: null where the row held NaN
    raw = re.search(r'id="report-data">(.*?)</script>', r.text, re.S).group(1)
    assert "NaN" not in raw and '"train_loss":null' in raw
