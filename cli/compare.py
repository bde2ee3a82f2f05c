"""The comparison chart of finished jobs as a PNG file, read through the HTTP API like any client
(`driftsafe demo` writes one next to its adapters): new-fact accuracy against forgetting, one
curve per job, the forgetting budget drawn (api/charts.py draws it)."""

from __future__ import annotations

from pathlib import Path

import httpx


def _all_pages(http: httpx.Client, path: str) -> list[dict]:
    rows, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        body = http.get(path, params=params).raise_for_status().json()
        rows += body["data"]
        if not body["has_more"]:
            return rows
        after = body["last_id"]


def save_comparison(http: httpx.Client, job_ids: list[str], path: Path) -> Path:
    """`http` is a client of the API's /v1 with the tenant's key; returns the file written."""
    from api.charts import compare_png

    runs = []
    for job_id in job_ids:
        job = http.get(f"/fine_tuning/jobs/{job_id}").raise_for_status().json()
        events = _all_pages(http, f"/fine_tuning/jobs/{job_id}/events")
        checkpoints = _all_pages(http, f"/fine_tuning/jobs/{job_id}/checkpoints")
        runs.append((job, events, checkpoints))
    path.write_bytes(compare_png(runs))
    return path
