"""What a fine-tuning job asks for: method, hyperparameters, adapter, evaluation.

Pydantic models with no torch import, so the API validates request bodies with the very classes
the trainer runs from. Field names follow API.md; `"auto"` is accepted where OpenAI accepts it and
`resolve_auto` turns it into the numbers a job reports.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHOD_TYPES = ("supervised", "self_distillation", "frozen_groups")
GROUPS = ("attention", "mlp", "embeddings", "lm_head", "norms")
_LAYER_RANGE = re.compile(r"^layers:([0-9]+)(?:-([0-9]+))?$")
# The OpenAPI document that clients (and generators) read is exactly as strict as validation:
# constraints are Field constraints where JSON Schema can say them, and a validator that checks
# more also states it in the schema (json_schema_extra). Only a layer range's order is beyond a
# schema (its description says it).
TRAINABLE_PATTERN = "^(" + "|".join(GROUPS) + r"|layers:[0-9]+(-[0-9]+)?)$"
_TRAINABLE = re.compile(TRAINABLE_PATTERN)
NO_CONTROL_CHARS = r"^[^\x00-\x1F\x7F]*$"  # C0 controls and DEL: never in an id or a name

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_both(a: str, b: str) -> dict:
    """JSON Schema for "not a number in both `a` and `b`" (what `_one_learning_rate` checks)."""
    return {"not": {"required": [a, b], "properties": {a: {"type": "number"},
                                                      b: {"type": "number"}}}}


class SupervisedHyperparameters(_Strict):
    model_config = ConfigDict(json_schema_extra=_not_both("learning_rate",
                                                          "learning_rate_multiplier"))

    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = Field(
        "auto", description="Passes over the training file.")
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        "auto", description="Examples per optimizer step.")
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] | Auto = Field(
        "auto", description="Peak AdamW learning rate (absolute, not OpenAI's multiplier).")
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto | None = Field(
        None,
        description="OpenAI's knob: scales the default learning rate. Not with learning_rate.")
    # Warmup then cosine decay: on the fact world it cut self-distillation's forgetting from a
    # third of SFT's (constant rate) to a fifth, with every new fact learned (README, bench).
    warmup_ratio: float = Field(0.05, ge=0, le=0.5, description="Share of steps of linear warmup.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    max_seq_len: int = Field(512, ge=8, le=32768, description="Tokens kept per example.")
    micro_batch_tokens: int | None = Field(
        None, ge=8, le=10_000_000, description="Most padded tokens in one forward/backward: a "
        "batch over it is split into micro-batches whose gradients accumulate, so batch_size "
        "stays the examples per optimizer step and a long example never runs out of memory. "
        "null: the whole batch at once.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute decoder activations in backward instead of keeping them "
        "(less memory, about a third more compute); works with LoRA.")
    weight_anchor: float = Field(
        0.0, ge=0, le=1e6, description="mu: an L2 pull toward the weights training starts from, "
        "mu/2 * ||theta - theta_0||^2 over the trained parameters (the paper's weight-space "
        "baseline). 0: off.")
    stop_at_new_fact_accuracy: float | None = Field(
        None, gt=0, le=1, description="End training at the first checkpoint that answers this "
        "share of the training questions the base did not know (new facts): later steps mostly "
        "add forgetting. Needs known-fact scoring; null: train every epoch.")

    @model_validator(mode="after")
    def _one_learning_rate(self):
        if self.learning_rate != "auto" and self.learning_rate_multiplier not in (None, "auto"):
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return self


class SelfDistillationHyperparameters(SupervisedHyperparameters):
    distill_weight: float = Field(1.0, ge=0, le=100, description="lambda: weight of the KL term.")
    distill_temperature: float = Field(0.5, gt=0, le=20, description="tau: softmax temperature.")
    teacher: Literal["base", "format_warmup"] = Field(
        "base", description="base: the frozen base model (under LoRA, the adapter switched off); "
                            "format_warmup: the base after one epoch on the examples it knows.")
    distill_positions: Literal["answer", "all"] = Field(
        "answer", description="Positions carrying the KL: answer tokens only, or every token.")
    distill_weight_final: float | None = Field(
        None, ge=0, le=100, description="lambda at the last step: lambda moves linearly from "
        "distill_weight to this over the run (a schedule). null: constant.")
    distill_weight_new_facts: float | None = Field(
        None, ge=0, le=100, description="lambda on the examples the base model did not answer "
        "right (new facts), where the teacher's answer is the old one; the others keep "
        "distill_weight. Needs known-fact scoring. null: the same lambda everywhere.")
    teacher_cache: Literal["auto", "exact", "topk", "off"] = Field(
        "auto", description="The frozen teacher's distributions at the KL positions, computed "
        "once before the first step and reused every epoch (trainer.teacher_cache): exact "
        "(temperature-scaled log-probs over the whole vocabulary; the same loss as a live "
        "teacher), topk (the teacher_cache_top_k largest log-probs plus the tail mass; the KL "
        "of those coarse-grained distributions), auto (exact where it fits in 256 MiB, else "
        "topk), off (the teacher runs a forward pass every step).")
    teacher_cache_top_k: int = Field(
        64, ge=1, le=4096, description="Tokens kept per position by a topk teacher cache.")


class FrozenGroupsHyperparameters(SupervisedHyperparameters):
    # The pattern is checked by `_known_groups` (so an error names `trainable` and says which
    # groups exist) and stated for the document here: the same constant, so they cannot differ.
    trainable: list[str] = Field(
        ..., min_length=1,
        json_schema_extra={"items": {"type": "string", "pattern": TRAINABLE_PATTERN}},
        description="Groups that train: attention, mlp, embeddings, lm_head, norms, and "
                    "optionally 'layers:A-B' (A <= B) or 'layers:A' to limit attention/mlp/norms "
                    "to decoder layers A..B.")

    @field_validator("trainable")
    @classmethod
    def _known_groups(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _TRAINABLE.fullmatch(name):  # fullmatch: `$` also matches before a final \n
                raise ValueError(f"unknown group {name!r}; use {list(GROUPS)} or 'layers:A-B'")
            m = _LAYER_RANGE.match(name)  # its order no pattern can check
            if m and m.group(2) and int(m.group(2)) < int(m.group(1)):
                raise ValueError(f"layer range {name!r} ends before it starts")
        if all(_LAYER_RANGE.match(n) for n in v):
            v = v + ["attention", "mlp"]  # a bare layer range means whole decoder layers
        return v

    def groups(self) -> set[str]:
        return {n for n in self.trainable if n in GROUPS}

    def layer_range(self) -> tuple[int, int] | None:
        ranges = [_LAYER_RANGE.match(n) for n in self.trainable]
        ranges = [m for m in ranges if m]
        if not ranges:
            return None
        lo = min(int(m.group(1)) for m in ranges)
        hi = max(int(m.group(2) or m.group(1)) for m in ranges)
        return lo, hi


class SupervisedBlock(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class SelfDistillationBlock(_Strict):
    hyperparameters: SelfDistillationHyperparameters = Field(
        default_factory=SelfDistillationHyperparameters)


class FrozenGroupsBlock(_Strict):
    hyperparameters: FrozenGroupsHyperparameters


def _block_matches_type_schema() -> dict:
    """JSON Schema for what `_block_matches_type` checks: only the block named by `type` may be
    given (not null), and frozen_groups must be given."""
    rules = []
    for kind in METHOD_TYPES:
        then: dict = {"properties": {o: {"type": "null"} for o in METHOD_TYPES if o != kind}}
        if kind == "frozen_groups":
            then |= {"required": [kind]}
            then["properties"][kind] = {"type": "object"}
        rules.append({"if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
                      "then": then})
    return {"allOf": rules}


class Method(_Strict):
    model_config = ConfigDict(json_schema_extra=_block_matches_type_schema())

    type: Literal["supervised", "self_distillation", "frozen_groups"]
    supervised: SupervisedBlock | None = None
    self_distillation: SelfDistillationBlock | None = None
    frozen_groups: FrozenGroupsBlock | None = None

    @model_validator(mode="after")
    def _block_matches_type(self):
        for other in METHOD_TYPES:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} given but method.type is {self.type!r}")
        if self.type == "frozen_groups" and self.frozen_groups is None:
            raise ValueError("method.frozen_groups.hyperparameters.trainable is required")
        if self.type == "supervised" and self.supervised is None:
            self.supervised = SupervisedBlock()
        if self.type == "self_distillation" and self.self_distillation is None:
            self.self_distillation = SelfDistillationBlock()
        return self

    @property
    def hyperparameters(self) -> SupervisedHyperparameters:
        return getattr(self, self.type).hyperparameters


ModuleName = Annotated[str, Field(pattern=NO_CONTROL_CHARS)]


class AdapterSpec(_Strict):
    type: Literal["lora", "full"] = "lora"
    r: int = Field(16, ge=1, le=512)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[ModuleName] | Literal["all-linear"] = Field(
        "all-linear", description="Module names LoRA wraps; frozen_groups narrows them further.")


class EvaluationSpec(_Strict):
    known_facts_file: str | None = Field(None, pattern=NO_CONTROL_CHARS,
                                         description="QA file of facts the base knows.")
    max_forgetting: float = Field(0.05, ge=0, le=1, description="Budget for drift_safe.")
    eval_every_n_epochs: int | None = Field(None, ge=1, description="Score at every checkpoint "
                                                                    "this often.")
    max_known_facts: int = Field(1000, ge=1, le=100_000)
    match: Literal["exact", "prefix", "contains"] = Field(
        "exact", description="How a greedy answer is judged against the accepted answers, after "
        "normalisation (lower case, no punctuation or articles): exact (the whole answer), "
        "prefix (the answer's first line starts with one), contains (its first line contains "
        "one). prefix/contains suit chat models that answer in sentences.")


class TrainSpec(_Strict):
    """Everything the trainer needs besides the data: one job's recipe."""

    method: Method
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    preset: Literal["drift_safe"] | None = Field(
        None, description="The preset the method came from (trainer.presets); a label only.")


def _auto_for_model(hp, adapter: str, n_examples: int, params: int) -> None:
    """Conventional values for a model that is not built in (README, "Bring your own model"):
    batch 16; 3 epochs, more for small sets (at most 10, about 3,000 examples seen); peak
    learning rate by adapter and size: LoRA 2e-4 (1e-4 from 10B parameters), full fine-tuning
    2e-5 below 1B, 1e-5 to 10B, 5e-6 beyond."""
    if hp.batch_size == "auto":
        hp.batch_size = max(1, min(16, n_examples))
    if hp.n_epochs == "auto":
        hp.n_epochs = int(min(10, max(3, math.ceil(3_000 / max(n_examples, 1)))))
    if hp.learning_rate == "auto":
        if adapter == "lora":
            base = 2e-4 if params < 10e9 else 1e-4
        else:
            base = 2e-5 if params < 1e9 else 1e-5 if params < 10e9 else 5e-6
        mult = hp.learning_rate_multiplier
        hp.learning_rate = base * (mult if isinstance(mult, float | int) else 1.0)


def resolve_auto(spec: TrainSpec, n_examples: int, model_params: int | None = None
                 ) -> TrainSpec:
    """Replace every "auto" with a number, from the size of the training set.

    For the built-in model (`model_params` None): small fact sets need many passes to be learned
    (SCIENCE.md: 1,200 facts take ~40 epochs), so epochs fall as the set grows, roughly constant
    total work; LoRA takes a larger step size. For any other model, conventional values for its
    size (`model_params`) and adapter (`_auto_for_model`).
    """
    hp = spec.method.hyperparameters.model_copy()
    if model_params is not None:
        _auto_for_model(hp, spec.adapter.type, n_examples, model_params)
    if hp.batch_size == "auto":
        hp.batch_size = max(1, min(32, n_examples // 8 or 1))
    if hp.n_epochs == "auto":
        hp.n_epochs = int(min(40, max(2, math.ceil(48_000 / max(n_examples, 1)))))
    if hp.learning_rate == "auto":
        base = 1e-3 if spec.adapter.type == "lora" else 3e-4
        mult = hp.learning_rate_multiplier
        hp.learning_rate = base * (mult if isinstance(mult, float | int) else 1.0)
    if hp.learning_rate_multiplier == "auto":
        hp.learning_rate_multiplier = None
    method = spec.method.model_copy()
    block = getattr(method, method.type).model_copy(update={"hyperparameters": hp})
    setattr(method, method.type, block)
    return spec.model_copy(update={"method": method})
