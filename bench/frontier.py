"""`driftsafe bench frontier`: new-fact learning against forgetting, checkpoint by checkpoint.

Every configuration fine-tunes the built-in base model of the world of `--seed` with LoRA (the
adapter users download; r=16, lr 1e-3, batch 32, 5% warmup then cosine, 20 epochs: SFT has
learned every new fact by epoch 10, and 12 configurations fit in 15 minutes), scores every
checkpoint on the training questions the base did not know (new-fact accuracy) and on the
held-out known facts (forgetting), and reports:
  best        the checkpoint with the least forgetting among those learning at least 95% of what
              SFT learns (an oracle: it looks at held-out facts to choose);
  early_stop  the first checkpoint learning that much: the rule a job can follow without the
              held-out facts (`stop_at_new_fact_accuracy`).

Configurations: SFT; self-distillation (SD) with lambda 0.5, 1, 2, 4; SD with the format-warmup
teacher; SD with the KL on every position; an L2 pull toward the starting weights at the strength
matched to SD's pull (`trainer.anchor`); and driftsafe's own levers, which the paper does not have:
  sd_ramp           lambda rising linearly from 0.5 to 4 over the run: learn first, then hold;
  sd_known_anchor   lambda 4 on the examples the base already answers (the teacher is right there)
                    and 1 on the new facts (where the teacher's answer is the old one);
  sd_short          lambda 2 over 8 epochs instead of 20: less time to drift;
  sd_soft_teacher   tau 2 instead of 0.5 and lambda 0.5: the teacher's whole distribution over
                    answers (its "dark knowledge"), not just its top answer, holds the student.
                    The `drift_safe` preset is this, stopped at the first qualifying checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.paper import LR_LORA
from bench.paper import _spec as paper_spec
from trainer.data import load_examples
from trainer.spec import EvaluationSpec, TrainSpec

EPOCHS, EVERY = 20, 2
LR = LR_LORA
SHARE_OF_SFT = 0.95
PRESET_CONFIG = "sd_soft_teacher"  # drawn in black: the recipe trainer/presets.py serves


def _spec(method: str, seed: int, epochs: int = EPOCHS, every: int = EVERY, **hp) -> TrainSpec:
    """The paper table's LoRA recipe (bench.paper), over `epochs`, scored every `every` epochs."""
    spec = paper_spec(method, adapter="lora", lr=LR, seed=seed, n_epochs=epochs, **hp)
    return spec.model_copy(update={"evaluation": EvaluationSpec(eval_every_n_epochs=every)})


def configurations(seed: int, epochs: int = EPOCHS) -> list[tuple[str, TrainSpec]]:
    sd = "self_distillation"
    return [
        ("sft", _spec("supervised", seed, epochs)),
        *[(f"sd_lambda_{lam:g}", _spec(sd, seed, epochs, distill_weight=lam))
          for lam in (0.5, 1.0, 2.0, 4.0)],
        ("sd_format_warmup", _spec(sd, seed, epochs, teacher="format_warmup")),
        ("sd_all_positions", _spec(sd, seed, epochs, distill_positions="all")),
        ("sd_ramp", _spec(sd, seed, epochs, distill_weight=0.5, distill_weight_final=4.0)),
        ("sd_known_anchor", _spec(sd, seed, epochs, distill_weight=4.0,
                                  distill_weight_new_facts=1.0)),
        ("sd_short", _spec(sd, seed, max(2, epochs * 2 // 5), every=2, distill_weight=2.0)),
        ("sd_soft_teacher", _spec(sd, seed, epochs, distill_weight=0.5, distill_temperature=2.0)),
    ]


def train_with_checkpoints(spec: TrainSpec, world_dir: Path, train_examples, known,
                           measure_pull: bool = False) -> tuple[list[dict], dict]:
    """Every checkpoint's scores ({step, new_fact_accuracy, forgetting, ...}) and the report."""
    from trainer.loop import Callbacks, TrainJob, train

    points: list[dict] = []

    def keep(info) -> None:
        if info.metrics:
            points.append({"step": info.step, **_point(info.metrics)})

    with TemporaryDirectory() as out:
        result = train(TrainJob(spec=spec, model_dir=world_dir / "model",
                                train_examples=train_examples, known_facts=known,
                                output_dir=Path(out), slick=None, measure_pull=measure_pull),
                       Callbacks(on_checkpoint=keep))
    if not points or points[-1]["step"] != result.step:
        points.append({"step": result.step, **_point(result.report)})
    return points, result.report


def _point(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("new_fact_accuracy", "forgetting",
                                        "representation_drift", "forgetting_seen_entities",
                                        "forgetting_unseen_entities")}


def choose(points: list[dict], floor: float) -> tuple[dict | None, dict | None]:
    """(best, early_stop): see the module docstring. None where no checkpoint learns enough."""
    enough = [p for p in points if (p["new_fact_accuracy"] or 0) >= floor]
    if not enough:
        return None, None
    return min(enough, key=lambda p: (p["forgetting"], p["step"])), enough[0]


def run_frontier(seed: int, epochs: int = EPOCHS, only: list[str] | None = None,
                 log=print) -> dict:
    from trainer.builtin import BuildConfig, ensure_world
    from trainer.world import WorldConfig

    world_dir = ensure_world(BuildConfig(world=WorldConfig(seed=seed)), log=log)
    train_examples = load_examples(world_dir / "train.jsonl")
    known = load_examples(world_dir / "heldout_known.jsonl")
    configs = configurations(seed, epochs)
    rows: list[dict] = []
    matched_mu = None
    started_all = time.monotonic()
    for name, spec in configs:
        if only and name not in only and name not in ("sft", "sd_lambda_1"):
            continue
        started = time.monotonic()
        points, report = train_with_checkpoints(spec, world_dir, train_examples, known,
                                                measure_pull=name == "sd_lambda_1")
        rows.append({"config": name, "spec": _hyperparameters(spec), "checkpoints": points,
                     "seconds": round(time.monotonic() - started, 1)})
        log(f"{name}: " + ", ".join(f"{p['step']}: {p['new_fact_accuracy']:.2f}/"
                                    f"{p['forgetting']:.3f}" for p in points)
            + f" ({rows[-1]['seconds']}s)")
        if name == "sd_lambda_1":
            matched_mu = report.get("matched_weight_anchor")
            if matched_mu and (not only or "l2_anchor" in only):
                spec = _spec("supervised", seed, epochs, weight_anchor=matched_mu)
                started = time.monotonic()
                points, _ = train_with_checkpoints(spec, world_dir, train_examples, known)
                rows.append({"config": "l2_anchor", "spec": _hyperparameters(spec),
                             "checkpoints": points,
                             "seconds": round(time.monotonic() - started, 1)})
                log(f"l2_anchor (mu={matched_mu:.4g}): " + ", ".join(
                    f"{p['step']}: {p['new_fact_accuracy']:.2f}/{p['forgetting']:.3f}"
                    for p in points))
    sft_new = rows[0]["checkpoints"][-1]["new_fact_accuracy"]
    floor = SHARE_OF_SFT * sft_new
    for row in rows:
        best, early = choose(row["checkpoints"], floor)
        row["best"] = best and {k: best[k] for k in ("step", "new_fact_accuracy", "forgetting")}
        row["early_stop"] = early and {k: early[k] for k in ("step", "new_fact_accuracy",
                                                             "forgetting")}
    return {"seed": seed, "epochs": epochs, "adapter": "lora", "sft_new_fact_accuracy": sft_new,
            "new_fact_floor": floor, "matched_weight_anchor": matched_mu,
            "seconds": round(time.monotonic() - started_all, 1), "configs": rows}


def _hyperparameters(spec: TrainSpec) -> dict:
    hp = spec.method.hyperparameters.model_dump(exclude_defaults=True)
    return {"method": spec.method.type, **hp}


def format_table(result: dict) -> str:
    def cell(p):
        if p is None:
            return "— (never learns enough)"
        return (f"{100 * p['new_fact_accuracy']:.1f}% / {100 * p['forgetting']:.1f} pts "
                f"(step {p['step']})")

    lines = [f"SFT learns {100 * result['sft_new_fact_accuracy']:.1f}% of new facts; a checkpoint "
             f"qualifies at >= {100 * result['new_fact_floor']:.1f}%.",
             "| config | final: new / forgetting | best qualifying | first qualifying |",
             "|---|---|---|---|"]
    for row in result["configs"]:
        last = row["checkpoints"][-1]
        lines.append(f"| {row['config']} | {cell(last)} | {cell(row['best'])} | "
                     f"{cell(row['early_stop'])} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """One curve per configuration through its checkpoints (new-fact accuracy against
    forgetting), the 1-point target and the 95%-of-SFT floor drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(result["configs"]):
        xs = [100 * p["forgetting"] for p in row["checkpoints"]]
        ys = [100 * p["new_fact_accuracy"] for p in row["checkpoints"]]
        preset = row["config"] == PRESET_CONFIG
        color = "black" if preset else cmap(i % 10)
        ax.plot(xs, ys, marker="o", ms=3.5, lw=2.6 if preset else 1.4, color=color,
                ls="-" if preset or i < 10 else "--",
                label=f"{row['config']} (the drift_safe preset)" if preset else row["config"])
        ax.annotate("end", (xs[-1], ys[-1]), fontsize=6, color=color,
                    xytext=(3, -8), textcoords="offset points")
    ax.axvline(1.0, color="black", ls="--", lw=1, label="1-point forgetting target")
    ax.axhline(100 * result["new_fact_floor"], color="grey", ls=":", lw=1,
               label="95% of what SFT learns")
    ax.set_xlabel("forgetting of held-out known facts (points)")
    ax.set_ylabel("new-fact accuracy (%)")
    ax.set_title(f"driftsafe frontier: LoRA, built-in world seed {result['seed']}, "
                 "every checkpoint")
    ax.set_xlim(left=min(-0.5, ax.get_xlim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args) -> int:
    result = run_frontier(args.seed, epochs=args.epochs,
                          only=args.only.split(",") if args.only else None,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
