"""A job's curves, read off the JSON the API serves (the job object, its events, its
checkpoints), and drawn as PNG images: the job report and the comparison of several jobs.

`report_series` is the one reading of that JSON on the server; api/ui/static/report.js reads it
the same way in the browser (tests/browser holds the two to the same answer). matplotlib is
imported inside the drawing functions: the API process loads it on the first PNG, not at start.
"""

from __future__ import annotations

import io
import math
from typing import Any

# Keys of a checkpoint's scores (worker/runner.py writes them into the checkpoint's metrics and
# into a metrics event; checkpoints are pruned, their events are not).
SCORE_KEYS = ("new_fact_accuracy", "heldout_known_accuracy", "forgetting", "hallucination_rate")
LOSS_KEYS = ("train_loss", "distill_loss")
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
SIZE_PX = (1200, 800)
COLORS = {"new_fact_accuracy": "#1f77b4", "heldout_known_accuracy": "#2ca02c",
          "forgetting": "#d62728", "hallucination_rate": "#9467bd",
          "train_loss": "#1f77b4", "distill_loss": "#ff7f0e", "budget": "#7f7f7f"}
LABELS = {"new_fact_accuracy": "new-fact accuracy", "heldout_known_accuracy":
          "held-out known accuracy", "forgetting": "forgetting", "hallucination_rate":
          "hallucination rate", "train_loss": "train loss", "distill_loss": "distill loss"}


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def report_series(job: dict, events: list[dict], checkpoints: list[dict]) -> dict[str, Any]:
    """Scores and losses by step (a resumed job may repeat a step: the newest event wins, and a
    checkpoint's own metrics win over its event), the budget, the drift-safe checkpoint (the
    newest kept one within the budget: what `?select=drift_safe` downloads) and the SliCK counts.
    """
    scores: dict[int, dict] = {}
    losses: dict[int, dict] = {}
    for event in sorted(events, key=lambda e: e.get("created_at", 0)):
        data = event.get("data") or {}
        step = data.get("step")
        if event.get("type") != "metrics" or not isinstance(step, int):
            continue
        if any(_number(data.get(k)) is not None for k in SCORE_KEYS):
            scores[step] = {k: _number(data.get(k)) for k in SCORE_KEYS}
        if _number(data.get("train_loss")) is not None:
            losses[step] = {k: _number(data.get(k)) for k in LOSS_KEYS}
    safe_steps = []
    for ckpt in checkpoints:
        metrics = ckpt.get("metrics") or {}
        if any(_number(metrics.get(k)) is not None for k in SCORE_KEYS):
            scores[ckpt["step_number"]] = {k: _number(metrics.get(k)) for k in SCORE_KEYS}
        if metrics.get("drift_safe") is True:
            safe_steps.append(ckpt["step_number"])
    evaluation = job.get("evaluation") or {}
    categories = evaluation.get("knowledge_categories") or {}
    return {
        "scores": [{"step": s, **scores[s]} for s in sorted(scores)],
        "losses": [{"step": s, **losses[s]} for s in sorted(losses)],
        "budget": _number(evaluation.get("max_forgetting")),
        "drift_safe_step": max(safe_steps) if safe_steps else None,
        "categories": {name: int(categories.get(name) or 0) for name in CATEGORIES}
        if categories else {},
    }


def job_label(job: dict) -> str:
    """What a person calls the job: its suffix, else its method, with the id's tail."""
    name = job.get("user_provided_suffix") or (job.get("method") or {}).get("type") or "job"
    return f"{name} ({job['id'][-6:]})"


def _figure(width_px: int, height_px: int):
    from matplotlib.figure import Figure  # no pyplot: no global state shared between threads

    return Figure(figsize=(width_px / 100, height_px / 100), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _percent_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)


def report_png(job: dict, events: list[dict], checkpoints: list[dict]) -> bytes:
    """The report as one image: scores and the budget over steps with the drift-safe checkpoint
    marked, the losses, and the SliCK categories of the training set."""
    series = report_series(job, events, checkpoints)
    fig = _figure(*SIZE_PX)
    facts, loss, cats = fig.subplot_mosaic([["facts", "facts"], ["loss", "cats"]]).values()
    progress = job.get("progress") or {}
    status = f"{job['status']}" + (f" {progress['step']}/{progress['total_steps']}"
                                    if progress.get("total_steps") else "")
    title = [job["id"], job.get("user_provided_suffix"), (job.get("method") or {}).get("type"),
             status]
    # Text from the client (the suffix) is drawn as text: parse_math off, so '$' is no markup.
    fig.suptitle(" · ".join(str(t) for t in title if t), parse_math=False)

    scores = series["scores"]
    for key in SCORE_KEYS:
        points = [(p["step"], p[key]) for p in scores if p[key] is not None]
        if points:
            facts.plot(*zip(*points), marker="o", ms=4, color=COLORS[key], label=LABELS[key])
    if series["budget"] is not None:
        facts.axhline(series["budget"], color=COLORS["budget"], ls="--",
                      label=f"forgetting budget ({series['budget']:.0%})")
    safe = next((p for p in scores if p["step"] == series["drift_safe_step"]), None)
    if safe is not None:
        facts.axvline(safe["step"], color="#e6a700", ls=":", lw=1)
        facts.plot([safe["step"]], [safe["forgetting"] or 0], marker="*", ms=16, ls="",
                   color="#e6a700", label=f"drift-safe checkpoint (step {safe['step']})")
    facts.set_title("Facts over training steps")
    facts.set_xlabel("step")
    last = max([progress.get("total_steps") or 0, *(p["step"] for p in scores), 1])
    facts.set_xlim(0, last * 1.02)
    _percent_axis(facts)
    if not scores:
        facts.text(0.5, 0.5, "no checkpoint scored yet", transform=facts.transAxes,
                   ha="center", color="#7f7f7f")
    facts.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)

    for key in LOSS_KEYS:
        points = [(p["step"], p[key]) for p in series["losses"] if p[key] is not None]
        if points:
            loss.plot(*zip(*points), color=COLORS[key], label=LABELS[key])
    loss.set_title("Loss")
    loss.set_xlabel("step")
    loss.grid(alpha=0.3)
    if series["losses"]:
        loss.legend(fontsize=9)

    counts = series["categories"]
    cats.bar(list(counts) or list(CATEGORIES), list(counts.values()) or [0] * len(CATEGORIES),
             color=["#2ca02c", "#bcbd22", "#ff7f0e", "#d62728"])
    cats.set_title("Training set by SliCK category" + ("" if counts else " (not measured yet)"))
    if not counts:
        cats.set_ylim(0, 1)
        cats.set_yticks([])
    cats.grid(alpha=0.3, axis="y")
    return _png(fig)


def compare_png(runs: list[tuple[dict, list[dict], list[dict]]]) -> bytes:
    """New-fact accuracy against forgetting, one curve per job (its scored checkpoints in step
    order), with each forgetting budget drawn: a curve that stays left of its budget line while
    it climbs learned without forgetting past the budget."""
    fig = _figure(900, 600)
    ax = fig.subplots()
    budgets = set()
    for job, events, checkpoints in runs:
        series = report_series(job, events, checkpoints)
        points = [(p["forgetting"], p["new_fact_accuracy"]) for p in series["scores"]
                  if p["forgetting"] is not None and p["new_fact_accuracy"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", ms=4, label=job_label(job))
        if series["budget"] is not None:
            budgets.add(series["budget"])
    for budget in sorted(budgets):
        ax.axvline(budget, color=COLORS["budget"], ls="--",
                   label=f"forgetting budget ({budget:.0%})")
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    _percent_axis(ax)
    ax.set_xlabel("forgetting (held-out known facts the base knew, now wrong)")
    ax.set_ylabel("new-fact accuracy")
    ax.set_title("New facts learned against old facts forgotten")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    return _png(fig)
