"""`driftsafe bench paper`: the paper's table (Kaplan et al. 2026, Table 1) on the fact world.

Each row fine-tunes the built-in base model of the world of `--seed`, the whole model as the paper
did (lr 3e-4, batch 32, 40 epochs, 5% warmup then cosine decay), and scores it on the same
held-out known facts. Rows:
  sft                plain SFT on known + name-key new facts
  self_distillation  SFT + KL to the frozen base (lambda=1, tau=0.5)
  attention_only     attention trains, MLP (and everything else) frozen
  mlp_only           MLP trains, attention (and everything else) frozen
  known_only         SFT on the known training facts alone
  sft_name_keys      SFT on train.jsonl: known + new facts with name-like keys (the sft run)
  sft_uuid_keys      SFT on train_uuid.jsonl: the same known facts + as many UUID-key new facts
                     (UUID keys are two pretrained tokens, like names: trainer/world.py)
  l2_anchor          SFT + an L2 pull toward the base weights, at the strength matched to the
                     self_distillation row's pull (trainer/anchor.py)
  drift_safe_preset  the `drift_safe` preset (trainer/presets.py)
`--lora` adds LoRA rows for SFT, self-distillation and the preset (the service's default adapter).
Every row also carries representation drift and forgetting by entity stratum (held-out facts
about a person seen in training, or not).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from trainer.data import load_examples
from trainer.spec import TrainSpec

EPOCHS, BATCH, LR_FULL, LR_LORA = 40, 32, 3e-4, 1e-3
SCHEDULE = {"lr_scheduler": "cosine", "warmup_ratio": 0.05}  # the service's default recipe
COLUMNS = ("task_accuracy", "new_fact_accuracy", "base_heldout_known_accuracy",
           "heldout_known_accuracy", "forgetting", "representation_drift",
           "forgetting_seen_entities", "forgetting_unseen_entities")
L2_FROM = "self_distillation"  # the row whose pull the l2_anchor row matches


def _spec(method: str, *, adapter: str = "full", lr: float = LR_FULL, seed: int = 0,
          **extra) -> TrainSpec:
    hp = {"n_epochs": EPOCHS, "batch_size": BATCH, "learning_rate": lr, **SCHEDULE, **extra}
    return TrainSpec.model_validate({"method": {"type": method, method: {"hyperparameters": hp}},
                                     "adapter": {"type": adapter}, "seed": seed})


def _preset_spec(*, adapter: str = "full", lr: float = LR_FULL, seed: int = 0) -> TrainSpec:
    """The drift_safe preset as a job naming it gets it, with the table's epochs, batch and lr."""
    from trainer.presets import apply_preset, preset_evaluation
    from trainer.spec import EvaluationSpec, Method

    explicit = Method.model_validate({"type": "self_distillation", "self_distillation": {
        "hyperparameters": {"n_epochs": EPOCHS, "batch_size": BATCH, "learning_rate": lr}}})
    return TrainSpec(method=apply_preset("drift_safe", explicit, adapter),
                     adapter={"type": adapter}, evaluation=preset_evaluation(EvaluationSpec()),
                     preset="drift_safe", seed=seed)


def runs(seed: int, lora: bool) -> list[tuple[str, str, TrainSpec, str]]:
    """(run, method label, spec, which training file) for every row."""
    rows = [
        ("sft", "supervised", _spec("supervised", seed=seed), "mixed"),
        ("self_distillation", "self_distillation λ=1 τ=0.5",
         _spec("self_distillation", seed=seed, distill_weight=1.0, distill_temperature=0.5),
         "mixed"),
        ("attention_only", "frozen_groups [attention]",
         _spec("frozen_groups", seed=seed, trainable=["attention"]), "mixed"),
        ("mlp_only", "frozen_groups [mlp]", _spec("frozen_groups", seed=seed, trainable=["mlp"]),
         "mixed"),
        ("known_only", "supervised", _spec("supervised", seed=seed), "known"),
        ("sft_name_keys", "supervised", _spec("supervised", seed=seed), "mixed"),
        ("sft_uuid_keys", "supervised", _spec("supervised", seed=seed), "uuid_mixed"),
        ("l2_anchor", "supervised + L2 to base weights (matched)", None, "mixed"),
        ("drift_safe_preset", "preset drift_safe", _preset_spec(seed=seed), "mixed"),
    ]
    if lora:
        rows += [
            ("lora_sft", "supervised (LoRA r=16)",
             _spec("supervised", adapter="lora", lr=LR_LORA, seed=seed), "mixed"),
            ("lora_self_distillation", "self_distillation (LoRA r=16)",
             _spec("self_distillation", adapter="lora", lr=LR_LORA, seed=seed), "mixed"),
            ("lora_drift_safe_preset", "preset drift_safe (LoRA r=16)",
             _preset_spec(adapter="lora", lr=LR_LORA, seed=seed), "mixed"),
        ]
    return rows


def selected_runs(seed: int, lora: bool, only: list[str] | None):
    """`runs`, or the rows named in `only` (l2_anchor brings the row whose pull it matches)."""
    table = runs(seed, lora)
    if not only:
        return table
    unknown = set(only) - {run for run, *_ in table}
    if unknown:
        raise SystemExit(f"bench paper: no row {sorted(unknown)}; the rows are "
                         f"{[run for run, *_ in table]} (--lora adds the lora_ ones)")
    wanted = set(only) | ({L2_FROM} if "l2_anchor" in only else set())
    return [row for row in table if row[0] in wanted]


def training_sets(world_dir: Path) -> dict[str, list]:
    """The training sets, from the world's files (name and UUID files hold equal counts)."""
    world = json.loads((world_dir / "world.json").read_text())
    known_questions = {world["facts"][i]["question"] for i in world["train_known"]}
    mixed = load_examples(world_dir / "train.jsonl")
    return {"mixed": mixed, "uuid_mixed": load_examples(world_dir / "train_uuid.jsonl"),
            "known": [e for e in mixed if e.messages[0]["content"] in known_questions]}


def format_table(rows: list[dict]) -> str:
    head = ("| run | method | task acc | new-fact acc | base held-out | tuned held-out "
            "| forgetting | seen / unseen entities | repr. drift |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    def pts(v):
        return "—" if v is None else f"{100 * v:.1f}"

    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {pct(r['task_accuracy'])} | "
                     f"{pct(r['new_fact_accuracy'])} | {pct(r['base_heldout_known_accuracy'])} | "
                     f"{pct(r['heldout_known_accuracy'])} | {100 * r['forgetting']:.1f} pts | "
                     f"{pts(r['forgetting_seen_entities'])} / "
                     f"{pts(r['forgetting_unseen_entities'])} | {pct(r['representation_drift'])} |")
    return "\n".join(lines)


def run_paper(seed: int, lora: bool = False, only: list[str] | None = None,
              log=print) -> list[dict]:
    """The table's rows (`selected_runs`), trained and scored one after another."""
    from trainer.builtin import BuildConfig, ensure_world
    from trainer.loop import TrainJob, train
    from trainer.world import WorldConfig

    table = selected_runs(seed, lora, only)
    world_dir = ensure_world(BuildConfig(world=WorldConfig(seed=seed)), log=log)
    sets = training_sets(world_dir)
    known = load_examples(world_dir / "heldout_known.jsonl")
    rows: list[dict] = []
    for run, label, spec, which in table:
        if spec is None:  # l2_anchor: its strength comes from the self-distillation row
            mu = next(r["matched_weight_anchor"] for r in rows if r["run"] == L2_FROM)
            spec = _spec("supervised", seed=seed, weight_anchor=mu)
            label = f"{label}, mu={mu:.3g}"
        same = next((r for r in rows if r["spec"] == (spec, which)), None)
        if same is not None:  # sft_name_keys is the sft run itself: report it, don't rerun it
            rows.append({**same, "run": run, "method": label})
            continue
        started = time.monotonic()
        with TemporaryDirectory() as out:
            result = train(TrainJob(spec=spec, model_dir=world_dir / "model",
                                    train_examples=sets[which], known_facts=known,
                                    output_dir=Path(out), slick=None, save_checkpoints=False,
                                    measure_pull=run == L2_FROM))
        row = {"run": run, "method": label, **{k: result.report.get(k) for k in COLUMNS},
               "steps": result.step, "seconds": round(time.monotonic() - started, 1),
               "spec": (spec, which)}
        if run == L2_FROM:
            row["matched_weight_anchor"] = result.report["matched_weight_anchor"]
        rows.append(row)
        log(f"{run}: new {row['new_fact_accuracy']}, held-out {row['heldout_known_accuracy']:.3f}, "
            f"forgetting {row['forgetting']:.3f} ({row['seconds']}s)")
    return [{k: v for k, v in r.items() if k != "spec"} for r in rows]


def main(args) -> int:
    rows = run_paper(args.seed, lora=args.lora, only=args.only.split(",") if args.only else None,
                     log=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))
    return 0
