"""`driftsafe world build` and `driftsafe train`: the trainer without the service."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.data import DataFileError, load_examples, require_qa_facts


def world_build(args) -> int:
    from trainer.builtin import build_world_to

    out = build_world_to(Path(args.out), args.seed, log=lambda m: print(m, file=sys.stderr))
    for name in ("model", "train.jsonl", "train_uuid.jsonl", "heldout_known.jsonl", "world.json"):
        print(out / name)
    return 0


def _spec_from_args(args, config: dict) -> dict:
    spec = dict(config.get("spec", {}))
    method_type = spec.get("method", {}).get("type", args.method)
    hp = dict(spec.get("method", {}).get(method_type, {}).get("hyperparameters", {}))
    flags = {"n_epochs": args.epochs, "batch_size": args.batch_size,
             "learning_rate": args.learning_rate, "distill_weight": args.distill_weight,
             "distill_temperature": args.distill_temperature, "teacher": args.teacher}
    hp.update({k: v for k, v in flags.items() if v is not None})
    if args.trainable:
        hp["trainable"] = [g.strip() for g in args.trainable.split(",") if g.strip()]
    spec["method"] = {"type": method_type, method_type: {"hyperparameters": hp}}
    spec.setdefault("adapter", {"type": args.adapter})
    if args.max_forgetting is not None:
        spec.setdefault("evaluation", {})["max_forgetting"] = args.max_forgetting
    if args.seed is not None:
        spec["seed"] = args.seed
    return spec


def _progress(metrics: dict) -> None:
    parts = [f"step {metrics['step']}/{metrics['total_steps']}", f"epoch {metrics['epoch']:.1f}",
             f"loss {metrics['train_loss']:.4f}"]
    if "distill_loss" in metrics:
        parts.append(f"kl {metrics['distill_loss']:.4f}")
    parts.append(f"~{metrics['seconds_remaining']:.0f}s left")
    print("  ".join(parts), file=sys.stderr)


def train_command(args) -> int:
    from pydantic import ValidationError

    from trainer.builtin import default_world_dir
    from trainer.loop import Callbacks, TrainJob, train
    from trainer.spec import TrainSpec

    config = json.loads(Path(args.config).read_text()) if args.config else {}
    world = None
    if (not (args.model or config.get("model"))
            or not (args.training_file or config.get("training_file"))):
        world = default_world_dir(log=lambda m: print(m, file=sys.stderr))
    model = Path(args.model or config.get("model") or world / "model")
    train_file = args.training_file or config.get("training_file") or world / "train.jsonl"
    known_file = args.known_facts or config.get("known_facts_file") or (
        world / "heldout_known.jsonl" if world else None)
    try:
        spec = TrainSpec.model_validate(_spec_from_args(args, config))
        examples = load_examples(train_file)
        known = load_examples(known_file) if known_file else []
        require_qa_facts(known, "known-fact")
    except ValidationError as e:
        print(f"error: invalid settings: {e}", file=sys.stderr)
        return 2
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job = TrainJob(spec=spec, model_dir=model, train_examples=examples, known_facts=known,
                   output_dir=Path(args.out))
    callbacks = Callbacks(on_event=lambda level, msg: print(f"[{level}] {msg}", file=sys.stderr),
                          on_metrics=_progress)
    result = train(job, callbacks)
    print(json.dumps({"status": result.status, "steps": result.step,
                      "trained_tokens": result.trained_tokens,
                      "hyperparameters": result.spec.method.hyperparameters.model_dump(),
                      "adapter": str(result.final_dir / "adapter") if result.final_dir else None,
                      "evaluation": result.report}, indent=1, default=float))
    return 0
