"""Presets: measured recipes a job names instead of spelling out a method.

`"preset": "drift_safe"` on job creation (API.md) fills the method and its hyperparameters with
the best drift-safe recipe `driftsafe bench frontier` found (README, "What the trainer
measures"); whatever the request states explicitly wins over the preset, field by field. The job
object shows the method as resolved.
"""

from __future__ import annotations

from trainer.spec import EvaluationSpec, Method

PRESET_NAMES = ("drift_safe",)

# Self-distillation from a soft teacher (tau 2: its whole distribution over answers holds the
# student, not only its top answer) at lambda 0.5, stopped at the first checkpoint that answers
# 95% of the new facts: on the built-in world's frontier (seed 0, LoRA) it forgot 1.2 points
# there, against 2.1 for lambda 1, tau 0.5 (README, "Past the paper").
_DRIFT_SAFE = {
    adapter: {"distill_weight": 0.5, "distill_temperature": 2.0,
              "stop_at_new_fact_accuracy": 0.95}
    for adapter in ("lora", "full")
}
_EVALUATION = {"eval_every_n_epochs": 2}  # the stop rule is checked at checkpoints


class PresetConflict(ValueError):
    """The request's own method contradicts the preset's; the message says how."""


def apply_preset(name: str, method: Method | None, adapter_type: str) -> Method:
    """The preset's method, with every hyperparameter the request set explicitly kept."""
    if name != "drift_safe":
        raise PresetConflict(f"unknown preset {name!r}; use one of {list(PRESET_NAMES)}")
    if method is not None and method.type != "self_distillation":
        raise PresetConflict(f"preset 'drift_safe' is a self_distillation recipe; method.type "
                             f"is {method.type!r}. Drop the method, or the preset.")
    explicit = {}
    if method is not None:
        hp = method.self_distillation.hyperparameters
        explicit = hp.model_dump(include=hp.model_fields_set)
    return Method.model_validate({"type": "self_distillation", "self_distillation": {
        "hyperparameters": {**_DRIFT_SAFE[adapter_type], **explicit}}})


def preset_evaluation(evaluation: EvaluationSpec) -> EvaluationSpec:
    """The preset's checkpoint cadence, unless the request chose one."""
    chosen = evaluation.model_fields_set
    return evaluation.model_copy(update={k: v for k, v in _EVALUATION.items()
                                         if k not in chosen})
